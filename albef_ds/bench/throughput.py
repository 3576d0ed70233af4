"""`albef-ds bench throughput`: the real pre-training step, timed, with a breakdown, MFU and a baseline.

Recipes (`RECIPES`; `--recipe all` runs every one in the same run, `both` = ours and reference):
    ours                 the production default
    ours+compile         the same with `train.compile=true` (regional torch.compile of the ViT / BERT blocks;
                         compilation happens in the warm-up steps, which are not timed)
    ours+patch_dropout   the same with `model.vision.patch_dropout` (FLIP-style; `--patch-dropout`, default
                         0.5): fewer image tokens, fewer model FLOPs, and its MFU counts only those
    reference            the reference implementation's execution choices (below)
With `--repeats N` the recipes run N times, interleaved (ours, ours+compile, ..., ours, ...), so a load that
comes and goes on the machine touches every recipe alike; each recipe reports its min / median / max
samples/s and the ratios to ours and to the reference per repeat.

For each recipe it builds the model and the
configured engine (DeepSpeed ZeRO-2 or torch), runs W warm-up and N timed optimizer steps, and reports:
samples/s (global and per device), step time and where it goes, peak memory, and MFU from the analytic FLOP
count (`albef_ds.bench.flops`). The reference recipe reruns the reference implementation's execution choices
with the same model: fp32, a per-tensor EMA loop, hard negatives drawn row by row (a host sync each), the MLM
vocabulary head over every position and the unfused ITC; its MFU counts the same model FLOPs as ours (the
useful work), so MFU and samples/s give the same ratio. With `model.vision.patch_dropout` set, "ours" drops
patches and its model FLOPs count only the kept tokens (an honest MFU, not one inflated by skipped work);
the reference recipe always sees every patch.

Step sections (seconds per step, summed over ranks' own clocks; on a GPU CUDA events, read once at the end):
    data             waiting for the next batch (0 with synthetic data already on the device)
    ema              momentum EMA over every momentum tensor
    online_forward   ViT + text encoder of the online model
    momentum_forward ViT_m + text encoder_m (ITC targets, queue features)
    itc              ITC loss with momentum distillation over [batch; queue]
    itm              hard-negative draw + fusion over 3B pairs + ITM head
    mlm              masking + BERT + vocabulary head, online and momentum
    backward         backward (with ZeRO-2's gradient reduce-scatter on several ranks)
    optimizer        optimizer step (with ZeRO-2's parameter all-gather)
    queue_gather     the queue's all-gather + ring write
    other            the rest of the step (the loss sum, Python overhead)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..config import Config, ConfigError, config_to_dict
from ..train.dist_env import world_info_from_env
from ..train.monitor import peak_memory_gb
from ..train.trainer import StepHooks
from .flops import step_flops

log = logging.getLogger(__name__)

SECTIONS = (
    "data",
    "ema",
    "online_forward",
    "momentum_forward",
    "itc",
    "itm",
    "mlm",
    "backward",
    "optimizer",
    "queue_gather",
)

# Dense bf16 tensor-core peaks (FLOP/s) by device name; --peak-tflops overrides. The CPU has no entry.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "V100": 125e12}

FP32_DS_CONFIG = "ds_configs/zero2_fp32.json"

RECIPES = ("ours", "ours+compile", "ours+patch_dropout", "reference")
DEFAULT_PATCH_DROPOUT = 0.5


class SectionTimer(StepHooks):
    """Times named parts of a step: wall clock on the CPU, CUDA events on a GPU (read once, at `collect`)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._events: list = []

    def reset(self) -> None:
        self.totals.clear()
        self._events.clear()

    @contextlib.contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.totals[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()
        return dict(self.totals)


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> tuple[float | None, str]:
    if override_tflops > 0:
        return override_tflops * 1e12, "given (--peak-tflops)"
    if device.type != "cuda":
        return None, "no known peak for a CPU: pass --peak-tflops for an MFU"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak, f"{key} dense bf16"
    return None, f"no known peak for {name}: pass --peak-tflops"


def synthetic_batches(
    cfg: Config,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    n: int = 4,
    *,
    images: tuple[str, ...] = ("image",),
    classes: int = 0,
) -> list[dict]:
    """`n` batch dicts of random data at the config's shapes: token ids with [CLS] (id 2) first, an all-ones
    attention mask, one random image tensor per name in `images`, and a "label" in [0, classes) when
    classes > 0 (the fine-tuning tasks' batches)."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    s, length, vocab = cfg.model.vision.image_size, cfg.data.max_tokens, cfg.model.text.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (batch, length), generator=g)
        ids[:, 0] = 2  # [CLS]
        b = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        if classes > 0:
            b["label"] = torch.randint(classes, (batch,), generator=g).to(device)
        for name in images:
            b[name] = torch.randn(batch, 3, s, s, generator=g).to(device, dtype)
        out.append(b)
    return out


def _recipe_config(cfg: Config, recipe: str, patch_dropout: float = DEFAULT_PATCH_DROPOUT) -> Config:
    if recipe not in RECIPES:
        raise ConfigError(f"unknown benchmark recipe {recipe!r} (one of {', '.join(RECIPES)})")
    c = copy.deepcopy(cfg)
    c.train.grad_accum = 1
    c.train.global_batch_size = 0
    c.model.vit_init = c.model.bert_init = c.model.albef_init = ""  # random init: speed only
    if recipe == "ours+compile":
        c.train.compile = True
    if recipe == "ours+patch_dropout":
        if not 0.0 < patch_dropout < 1.0:
            raise ConfigError(f"--patch-dropout must lie in (0, 1), got {patch_dropout}")
        c.model.vision.patch_dropout = patch_dropout
    if recipe == "reference":  # the reference trains in fp32, on every patch
        c.model.vision.patch_dropout = 0.0
        c.train.precision = "fp32"
        if c.train.engine == "deepspeed":
            c.train.ds_config = FP32_DS_CONFIG
    return c


def build_recipe(
    cfg: Config,
    recipe: str,
    device: torch.device,
    *,
    patch_dropout: float = DEFAULT_PATCH_DROPOUT,
    hooks: StepHooks | None = None,
):
    """(trainer set up without data, the recipe's config, synthetic batches on the device) for one recipe:
    what the benchmark times and `benchmarks/sync_debug.py` runs under CUDA's sync debug mode."""
    from ..tasks.pretrain import PretrainTask
    from ..train.trainer import Trainer
    from .recipes import recipe_ops

    c = _recipe_config(cfg, recipe, patch_dropout)
    if c.train.compile:
        # A fresh model per repeat: without a reset, dynamo would add guards for each new instance of the
        # same block code until its recompile limit, then run the rest eagerly and time the wrong thing.
        torch._dynamo.reset()
    ops = recipe_ops("reference" if recipe == "reference" else "ours")
    trainer = Trainer(c, PretrainTask(c, ops=ops), hooks=hooks)
    trainer.setup(with_data=False, tokens={"pad": 0, "cls": 2, "mask": 4})
    trainer.model.train()
    return trainer, c, synthetic_batches(c, c.train.batch_size, device, trainer.engine.input_dtype)


def run_recipe(
    cfg: Config,
    recipe: str,
    *,
    warmup: int,
    steps: int,
    device: torch.device,
    info,
    patch_dropout: float = DEFAULT_PATCH_DROPOUT,
) -> dict:
    """Build, warm up and time one recipe on the trainer's own step (`Trainer.train_step`, timed through
    its hooks and the model's sections); returns its measurements (every rank; rank 0 reports)."""
    if recipe == "ours+compile" and warmup < 1:
        raise ConfigError("the ours+compile recipe needs --warmup >= 1 (compilation happens there)")
    timer = SectionTimer(device)
    trainer, c, data = build_recipe(cfg, recipe, device, patch_dropout=patch_dropout, hooks=timer)
    batch = c.train.batch_size
    engine, model = trainer.engine, trainer.model
    model.sections = timer.section
    n_params = sum(p.numel() for p in model.parameters())
    losses = []
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            engine.barrier()
            timer.reset()
            t0 = time.perf_counter()
        pick = functools.partial(data.__getitem__, i % len(data))  # fetched inside the data section
        outs = trainer.train_step(lr=c.optim.warmup_lr, alpha=0.4, next_batch=pick)
        if i >= warmup:
            losses.append(outs[-1].loss.detach())
    sections = timer.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    engine.barrier()
    elapsed = time.perf_counter() - t0
    loss_vals = torch.stack(losses).float().tolist()
    if not all(v == v and abs(v) != float("inf") for v in loss_vals):
        raise FloatingPointError(f"non-finite loss in the {recipe} benchmark: {loss_vals}")
    step_s = elapsed / steps
    breakdown = {k: sections.get(k, 0.0) / steps for k in SECTIONS}
    breakdown["other"] = max(0.0, step_s - sum(breakdown.values()))
    text_len = c.data.max_tokens
    model_flops = step_flops(c.model, batch, text_len).total
    executed = step_flops(
        c.model, batch, text_len, mlm_head_positions="all" if recipe == "reference" else "masked"
    )
    res = {
        "recipe": recipe,
        "params_trainable": n_params,
        "precision": "fp32" if recipe == "reference" else c.train.precision,
        # model FLOPs (hence MFU) count the 1 + K image tokens the online ViT keeps (bench.flops)
        "patch_dropout": c.model.vision.patch_dropout,
        "batch_per_device": batch,
        "steps": steps,
        "warmup": warmup,
        "elapsed_s": elapsed,
        "step_time_s": step_s,
        "samples_per_s": batch * info.world_size / step_s,
        "samples_per_s_per_device": batch / step_s,
        "breakdown_s": breakdown,
        "peak_mem_gb": peak_memory_gb(device),
        "model_flops_per_step": model_flops,
        "executed_flops_per_step": executed.total,
        "executed_flops_by_component": executed.as_dict(),
        "achieved_tflops_per_device": model_flops / step_s / 1e12,
        "mean_loss": sum(loss_vals) / len(loss_vals),
    }
    if trainer.compile_counters is not None:
        # graphs, graph breaks, recompilations and compile time (all in the warm-up steps)
        res["compile"] = trainer.compile_counters.summary()
    model.sections = None
    del trainer, engine, model, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _spread(values: list[float]) -> dict:
    v = sorted(values)
    return {
        "min": v[0],
        "median": v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2,
        "max": v[-1],
        "runs": values,
    }


def _median_run(runs: list[dict]) -> dict:
    """The repeat with the median samples/s (the lower middle one for an even count), with the spread of
    every repeat's samples/s and step time under `repeats_summary`."""
    order = sorted(runs, key=lambda r: r["samples_per_s"])
    out = dict(order[(len(order) - 1) // 2])
    out["repeats_summary"] = {
        "samples_per_s": _spread([r["samples_per_s"] for r in runs]),
        "step_time_s": _spread([r["step_time_s"] for r in runs]),
    }
    return out


def plot_breakdown(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["recipes"]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.7 * len(runs)))
    names = [*SECTIONS, "other"]
    colors = plt.get_cmap("tab20").colors
    for row, r in enumerate(runs):
        left = 0.0
        for j, k in enumerate(names):
            ms = r["breakdown_s"][k] * 1000
            ax.barh(row, ms, left=left, color=colors[j % len(colors)], label=k if row == 0 else None)
            left += ms
        sp = r.get("repeats_summary", {}).get("samples_per_s")
        spread = f" (min {sp['min']:.1f}, max {sp['max']:.1f})" if sp and len(sp["runs"]) > 1 else ""
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        ax.text(left, row, f"  {r['samples_per_s']:.1f} samples/s{spread}{mfu}", va="center", fontsize=8)
    ax.set_yticks(range(len(runs)), [r["recipe"] for r in runs])
    ax.set_xlabel("ms per optimizer step")
    ax.set_title(
        f"{result['config_name']}: batch {result['batch_per_device']}/device x {result['world_size']} on "
        f"{result['device_name']}"
    )
    ax.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_throughput(
    cfg: Config,
    *,
    config_name: str,
    recipes: list[str],
    warmup: int,
    steps: int,
    out: Path,
    peak_tflops: float = 0.0,
    tensorboard: bool = False,
    profile: bool = False,
    repeats: int = 1,
    patch_dropout: float = DEFAULT_PATCH_DROPOUT,
) -> dict:
    """Run the benchmark on this process's ranks (one process, or every rank of a launcher); rank 0 writes
    `out` (JSON) and the PNG beside it, and returns the result. Each recipe's entry is its median repeat
    (by samples/s) with the spread of all repeats beside it (`repeats_summary`)."""
    from ..train.engine import init_distributed
    from ..train.runtime import resolve_device

    if warmup < 0 or steps < 1:
        raise ConfigError(f"--warmup must be >= 0 and --steps >= 1 (got {warmup}, {steps})")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1 (got {repeats})")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes or len(set(recipes)) != len(recipes):
        raise ConfigError(f"recipes {recipes}: expected distinct names among {', '.join(RECIPES)}")
    if out.suffix != ".json":
        raise ConfigError(f"--out {out} must end in .json (the plot is written beside it as .png)")
    info = world_info_from_env()
    if cfg.train.engine == "torch" and info.world_size > 1:
        raise ConfigError("several ranks need train.engine=deepspeed")
    device = resolve_device(cfg.train.device, info.local_rank)
    if cfg.train.engine == "deepspeed":
        init_distributed(info, device)
    peak, peak_src = device_peak_flops(device, peak_tflops)
    result = {
        "config_name": config_name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device": str(device),
        "world_size": info.world_size,
        "engine": cfg.train.engine,
        "batch_per_device": cfg.train.batch_size,
        "text_len": cfg.data.max_tokens,
        "image_size": cfg.model.vision.image_size,
        "queue_size": cfg.model.queue_size,
        "params_trainable": None,
        "peak_flops_per_device": peak,
        "peak_source": peak_src,
        "versions": _versions(),
        "config": config_to_dict(cfg),
        "recipes": [],
    }
    prof_ctx = contextlib.nullcontext()
    if profile and info.rank == 0:
        prof_ctx = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]
            + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []),
        )
    runs: dict[str, list[dict]] = {r: [] for r in recipes}
    with prof_ctx as prof:
        for rep in range(repeats):
            for recipe in recipes:
                log.info(
                    "benchmarking the %s recipe (repeat %d/%d): %d warm-up + %d timed steps",
                    recipe,
                    rep + 1,
                    repeats,
                    warmup,
                    steps,
                )
                r = run_recipe(
                    cfg,
                    recipe,
                    warmup=warmup,
                    steps=steps,
                    device=device,
                    info=info,
                    patch_dropout=patch_dropout,
                )
                r["mfu"] = r["model_flops_per_step"] / r["step_time_s"] / peak if peak else None
                r["repeat"] = rep
                runs[recipe].append(r)
                log.info(
                    "%s: %.2f samples/s (%.2f per device), step %.1f ms, peak memory %.2f GB, MFU %s",
                    recipe,
                    r["samples_per_s"],
                    r["samples_per_s_per_device"],
                    r["step_time_s"] * 1000,
                    r["peak_mem_gb"],
                    f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
                )
    result["repeats"] = repeats
    result["recipes"] = [_median_run(runs[r]) for r in recipes]
    result["params_trainable"] = result["recipes"][0]["params_trainable"]
    # Ratios per repeat (both recipes of a ratio measured in the same round), then their spread.
    ratios: dict[str, list[float]] = {}
    for base in ("ours", "reference"):
        for recipe in recipes:
            if base in runs and recipe != base:
                ratios[f"{recipe} / {base}"] = [
                    a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs[recipe], runs[base])
                ]
    result["ratios"] = {k: _spread(v) for k, v in ratios.items()}
    if "ours / reference" in result["ratios"]:
        result["speedup_vs_reference"] = result["ratios"]["ours / reference"]["median"]
    if info.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        if profile and prof is not None:
            trace = out.with_suffix(".trace.json")
            prof.export_chrome_trace(str(trace))
            result["profiler_trace"] = str(trace)
        out.write_text(json.dumps(result, indent=1))
        plot_breakdown(result, out.with_suffix(".png"))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(out.with_suffix("")) + "_tb") as tb:
                for i, r in enumerate(result["recipes"]):
                    for k, v in r["breakdown_s"].items():
                        tb.add_scalar(f"{r['recipe']}/breakdown_ms/{k}", v * 1000, i)
                    tb.add_scalar(f"{r['recipe']}/samples_per_s", r["samples_per_s"], i)
    return result


def _versions() -> dict:
    import platform

    v = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import deepspeed

        v["deepspeed"] = deepspeed.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v
