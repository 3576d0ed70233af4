"""megatron-core and NVIDIA apex against what albef-ds already uses: what runs, what agrees, what it costs.

The measurements behind the README's decision (issue 18, deliverable 5), as JSON:

* footprint: megatron-core's version, installed size and required packages; whether Transformer Engine and
  NVIDIA apex are importable (apex: the PyPI project of that name is unrelated, so only a source build counts,
  recognised by `apex.optimizers.FusedAdam` / `apex.normalization.FusedLayerNorm`);
* import cost: `import megatron.core` in a fresh process after torch and after our model package (median of
  --repeats), its resident-memory growth and the modules it adds;
* GELU: megatron's fused bias-GELU is the tanh approximation; our blocks (timm ViT, our BERT) use the exact
  erf GELU. Max abs difference on a grid, at the activations of the debug model (random init and, with
  --weights, a trained one), and end to end on its pre-training losses and features;
* what of megatron-core runs on a CPU: its MLP (TP = 1) against ours, the local-spec ViT TransformerLayer,
  parallel_state, dist_checkpointing (each: ran, or the error it stopped with).

Megatron-core must not enter the project's environment (it is no dependency); install it beside it:
    pip install --no-deps --target /tmp/mcore-target "megatron-core>=0.16,<0.17"
    python benchmarks/megatron_check.py --mcore-path /tmp/mcore-target \
        [--weights runs/debug/albef.safetensors] --out benchmarks/results/megatron_check_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("megatron_check")

TOL = 1e-5  # the agreement our blocks keep with the reference model

# Runs in a fresh interpreter: the import time of megatron.core after `prelude`, the RSS it adds, the modules.
_IMPORT_PROBE = r"""
import json, sys, time
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
{prelude}
before = set(sys.modules); rss0 = rss_mb(); t0 = time.perf_counter()
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import megatron.core
dt = time.perf_counter() - t0
added = sorted(set(sys.modules) - before)
heavy = [m for m in ("torch._dynamo", "torch._inductor", "torch.distributed.tensor", "transformers")
         if m in added]
print(json.dumps({"s": dt, "rss_mb": rss_mb() - rss0, "modules_added": len(added), "heavy_added": heavy}))
"""

_PRELUDES = {
    "after_torch": "import torch",
    "after_albef_ds_model": "import torch, albef_ds.model",
    "after_albef_ds_train": "import torch, albef_ds.train.trainer",
}


def _err(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0][:240]}" if msg else f"{type(e).__name__} (no message)"


def footprint() -> dict:
    out: dict = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        dist = importlib.metadata.distribution("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return {**out, "megatron_core": None}
    files = [f for f in dist.files or [] if not str(f).endswith(".pyc")]
    size = sum(Path(dist.locate_file(f)).stat().st_size for f in files if Path(dist.locate_file(f)).is_file())
    requires = [r for r in dist.requires or [] if "extra ==" not in r]
    extras = sorted(
        {r.split("extra ==")[1].strip().strip("'\"") for r in dist.requires or [] if "extra ==" in r}
    )
    out.update(
        megatron_core=dist.version,
        installed_mb=round(size / 2**20, 1),
        installed_files=len(files),
        requires=requires,
        extras=extras,
        transformer_engine=_spec("transformer_engine"),
        apex=apex_status(),
    )
    return out


def _spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def apex_status() -> dict:
    """NVIDIA apex or not: its fused optimizer and norm modules, which the unrelated PyPI 'apex' lacks."""
    if not _spec("apex"):
        return {"installed": False}
    return {
        "installed": True,
        "nvidia": _spec("apex.optimizers") and _spec("apex.normalization"),
        "fused_adam": _spec("apex.optimizers"),
        "fused_layer_norm": _spec("apex.normalization"),
    }


def import_cost(mcore_path: str | None, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (mcore_path, str(ROOT), env.get("PYTHONPATH")) if p)
    out = {}
    for name, prelude in _PRELUDES.items():
        runs = []
        for _ in range(repeats):
            r = subprocess.run(
                [sys.executable, "-c", _IMPORT_PROBE.replace("{prelude}", prelude)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if r.returncode != 0:
                return {"error": r.stderr.strip().splitlines()[-1]}
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        out[name] = {
            "median_s": round(statistics.median(x["s"] for x in runs), 3),
            "all_s": [round(x["s"], 3) for x in runs],
            "rss_added_mb": round(statistics.median(x["rss_mb"] for x in runs), 1),
            "modules_added": runs[0]["modules_added"],
            "heavy_modules_added": runs[0]["heavy_added"],
        }
    # For scale: the same fresh interpreter importing torch alone.
    t = []
    for _ in range(repeats):
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                "import time; t=time.perf_counter(); import torch; print(time.perf_counter()-t)",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        t.append(float(r.stdout.strip().splitlines()[-1]))
    out["torch_alone_median_s"] = round(statistics.median(t), 3)
    return out


# ---------------------------------------------------------------------------------------------------- GELU
def gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    """Megatron's bias_gelu with a zero bias (fusions/fused_bias_gelu.py), written out."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _megatron_bias_gelu():
    """megatron's own (torch.compile'd) bias_gelu, or None without megatron-core."""
    try:
        from megatron.core.fusions.fused_bias_gelu import bias_gelu
    except ImportError:
        return None
    return lambda x: bias_gelu(torch.zeros((), dtype=x.dtype), x)


def gelu_grid() -> dict:
    x = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    exact = F.gelu(x)
    diff = (gelu_tanh_formula(x) - exact).abs()
    over = x[diff > TOL]
    xr = x.clone().requires_grad_(True)
    g_exact = torch.autograd.grad(F.gelu(xr).sum(), xr)[0]
    g_tanh = torch.autograd.grad(gelu_tanh_formula(xr).sum(), xr)[0]
    out = {
        "range": [-10, 10],
        "max_abs_diff": float(diff.max()),
        "at_x": float(x[diff.argmax()]),
        "grad_max_abs_diff": float((g_tanh - g_exact).abs().max()),
        "abs_x_range_over_tol": [float(over.abs().min()), float(over.abs().max())] if len(over) else None,
    }
    fn = _megatron_bias_gelu()
    if fn is not None:
        x32 = x.float()
        t0 = time.perf_counter()
        try:
            got = fn(x32)
            out["megatron_bias_gelu_cpu"] = {
                "ran": True,
                "first_call_s": round(time.perf_counter() - t0, 2),
                "vs_formula_max_abs_diff": float((got - gelu_tanh_formula(x32)).abs().max()),
                "vs_torch_tanh_gelu_max_abs_diff": float((got - F.gelu(x32, approximate="tanh")).abs().max()),
                "vs_exact_max_abs_diff": float((got - F.gelu(x32)).abs().max()),
            }
        except Exception as e:  # noqa: BLE001 -- what stops it on this machine is the measurement
            out["megatron_bias_gelu_cpu"] = {"ran": False, "error": _err(e)}
    return out


@contextlib.contextmanager
def _gelu_patched(approximate: str, record: list | None = None):
    """Every F.gelu call (timm's nn.GELU and our BERT blocks both go through it) with `approximate`;
    record: collects each call's input."""
    orig = F.gelu

    def gelu(x, approximate_arg: str = "none", **kw):
        if record is not None:
            record.append(x.detach().flatten().clone())
        return orig(x, approximate=approximate)

    F.gelu = gelu
    try:
        yield
    finally:
        F.gelu = orig


def _debug_model(weights: str | None):
    from albef_ds.config import load_config
    from albef_ds.model.albef import ALBEFPretrain

    cfg = load_config(ROOT / "configs/debug.yaml", [])
    torch.manual_seed(0)
    model = ALBEFPretrain(cfg.model, special_tokens={"pad": 0, "cls": 2, "mask": 4}).eval()
    if weights:
        from albef_ds.train.checkpoint import load_weights

        load_weights(model, weights)
    g = torch.Generator().manual_seed(0)
    b, s, n = 8, cfg.model.vision.image_size, cfg.data.max_tokens
    ids = torch.randint(5, cfg.model.text.vocab_size, (b, n), generator=g)
    ids[:, 0] = 2
    batch = {
        "image": torch.randn(b, 3, s, s, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }
    return model, batch


def _run(model, batch) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the MLM masking and the hard-negative draw
    with torch.no_grad():
        out = model(**batch, alpha=0.4)
        img = model.encode_image(batch["image"])[1]
    res = {k: getattr(out, k) for k in ("loss_itc", "loss_itm", "loss_mlm")}
    res["image_feat"] = img
    return res


def gelu_in_model(weights: str | None) -> dict:
    model, batch = _debug_model(weights)
    xs: list[torch.Tensor] = []
    with _gelu_patched("none", xs):
        exact = _run(model, batch)
    x = torch.cat(xs).double()
    d = (gelu_tanh_formula(x) - F.gelu(x)).abs()
    with _gelu_patched("tanh"):
        approx = _run(model, batch)
    return {
        "weights": weights or "random init (configs/debug.yaml)",
        "gelu_inputs": {
            "count": x.numel(),
            "abs_max": float(x.abs().max()),
            "abs_p99": float(x.abs().quantile(0.99)) if x.numel() <= 16_000_000 else None,
            "std": float(x.std()),
            "tanh_vs_exact_max_abs_diff": float(d.max()),
            "share_over_tol": float((d > TOL).double().mean()),
        },
        "end_to_end_max_abs_diff": {k: float((approx[k] - exact[k]).abs().max()) for k in exact},
    }


# ---------------------------------------------------------------------------------------- megatron on CPU
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megatron_on_cpu() -> dict:
    """What of megatron-core runs on this CPU: each piece ran, or the first error it stopped with."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    out: dict = {}
    try:
        parallel_state.initialize_model_parallel(1, 1)
        out["parallel_state_without_process_group"] = "ran"
    except Exception as e:  # noqa: BLE001
        out["parallel_state_without_process_group"] = _err(e)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        out["parallel_state_gloo_world_1"] = "ran"
        try:
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)
            out["model_parallel_cuda_manual_seed"] = "ran"
        except Exception as e:  # noqa: BLE001
            out["model_parallel_cuda_manual_seed"] = _err(e)

        # The MLP at TP = 1 against timm's Mlp / our BERT FFN: linear -> GELU -> linear.
        h, ffn = 96, 384  # the debug model's width; ALBEF-base: 768, 3072
        mlp_out = {}
        for fusion in (False, True):
            cfg = TransformerConfig(
                num_layers=1,
                hidden_size=h,
                num_attention_heads=3,
                ffn_hidden_size=ffn,
                use_cpu_initialization=True,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                add_bias_linear=True,
                activation_func=F.gelu,
                bias_activation_fusion=fusion,
            )
            try:
                mlp = MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
                torch.manual_seed(0)
                x = torch.randn(17, 4, h) * 3.0  # (tokens, batch, hidden)
                with torch.no_grad():
                    y, bias = mlp(x)
                    y = y + bias
                    ours = F.linear(
                        F.gelu(F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias)),
                        mlp.linear_fc2.weight,
                        mlp.linear_fc2.bias,
                    )
                mlp_out["bias_gelu_fusion" if fusion else "exact_gelu"] = {
                    "ran": True,
                    "vs_ours_max_abs_diff": float((y - ours).abs().max()),
                }
            except Exception as e:  # noqa: BLE001
                mlp_out["bias_gelu_fusion" if fusion else "exact_gelu"] = {"ran": False, "error": _err(e)}
        out["mlp_tp1"] = mlp_out

        out["vit_layer_local_spec"] = _vit_layer(TransformerConfig)
        out["vit_layer_transformer_engine_spec"] = _vit_layer(TransformerConfig, te=True)
        out["dist_checkpointing"] = _dist_checkpointing()
    finally:
        with contextlib.suppress(Exception):
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return out


def _vit_layer(TransformerConfig, *, te: bool = False) -> dict:
    from megatron.core.models.vision import vit_layer_specs
    from megatron.core.transformer.spec_utils import build_module

    res: dict = {}
    try:
        spec = (
            vit_layer_specs.get_vit_layer_with_transformer_engine_spec()
            if te
            else vit_layer_specs.get_vit_layer_with_local_spec()
        )
        res["attn_mask_type"] = str(spec.submodules.self_attention.params.get("attn_mask_type"))
        cfg = TransformerConfig(
            num_layers=1,
            hidden_size=96,
            num_attention_heads=3,
            ffn_hidden_size=384,
            use_cpu_initialization=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            layernorm_epsilon=1e-6,
            add_bias_linear=True,
            activation_func=F.gelu,
            bias_activation_fusion=False,
        )
        layer = build_module(spec, config=cfg, layer_number=1)
        res["built"] = True
        res["params"] = sum(p.numel() for p in layer.parameters())
    except Exception as e:  # noqa: BLE001
        return {**res, "built": False, "error": _err(e)}
    try:
        with torch.no_grad():
            layer(torch.randn(65, 2, 96), attention_mask=None)  # (tokens, batch, hidden)
        res["forward"] = "ran"
    except Exception as e:  # noqa: BLE001
        res["forward"] = _err(e)
    return res


def _dist_checkpointing() -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    w = torch.randn(64, 32)
    with tempfile.TemporaryDirectory() as d:
        try:
            dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", w, replica_id=0)}, d)
        except Exception as e:  # noqa: BLE001
            return {"save": _err(e)}
        try:
            got = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(64, 32))}, d)
            return {"save": "ran", "load": "ran", "round_trip_equal": bool(torch.equal(got["w"], w))}
        except Exception as e:  # noqa: BLE001
            return {"save": "ran", "load": _err(e)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mcore-path", default=None, help="folder holding megatron/ (pip install --target)")
    p.add_argument("--weights", default=None, help="trained albef weights for the GELU-input magnitudes")
    p.add_argument("--repeats", type=int, default=5, help="fresh interpreters per import-time figure")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/megatron_check_cpu.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex).*")
    torch.set_num_threads(1)
    if args.mcore_path:
        sys.path.insert(0, args.mcore_path)
    sys.path.insert(0, str(ROOT))
    res: dict = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "python benchmarks/megatron_check.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": "cpu",
        "cuda_available": torch.cuda.is_available(),
        "footprint": footprint(),
    }
    have = res["footprint"].get("megatron_core") is not None
    log.info("footprint: %s", res["footprint"])
    res["import_cost"] = import_cost(args.mcore_path, args.repeats) if have else None
    log.info("import cost: %s", res["import_cost"])
    res["gelu_grid"] = gelu_grid()
    res["gelu_debug_model"] = [gelu_in_model(None)] + ([gelu_in_model(args.weights)] if args.weights else [])
    log.info("gelu: %s %s", res["gelu_grid"], res["gelu_debug_model"])
    res["megatron_on_cpu"] = megatron_on_cpu() if have else None
    log.info("megatron on cpu: %s", res["megatron_on_cpu"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
