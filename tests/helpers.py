"""Small builders shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from albef_ds.config import ModelConfig, TextConfig, VisionConfig

SPECIAL = {"pad": 0, "cls": 2, "mask": 4}


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(
            vocab_size=50,
            hidden=32,
            layers=4,
            fusion_layer=2,
            heads=2,
            intermediate=64,
            max_position=32,
            dropout=0.0,
        ),
        embed_dim=16,
        queue_size=20,
    )
    base.update(kw)
    return ModelConfig(**base)


def _key_bias_free(name: str, t):
    """The part of a state tensor that affects the model's function.

    Attention key biases add the same score to every key of a query, which softmax ignores: their gradient is
    zero up to rounding, and Adam turns that rounding noise into steps of up to lr. Two runs may therefore
    differ there by far more than anywhere else without computing anything differently. ViT's fused qkv bias
    keeps its q and v thirds.
    """
    if name.endswith("attention.self.key.bias") or name.endswith("crossattention.self.key.bias"):
        return None
    if name.endswith("attn.qkv.bias"):
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d :]])
    return t


def assert_same_state(a: dict, b: dict, *, max_atol: float = 1e-4, mean_atol: float = 1e-6) -> None:
    """Two model state dicts agree: integers exactly; floats (key biases excepted, see above) with a mean
    absolute difference <= mean_atol and no element further apart than max_atol.

    Why two bounds: CPU kernels reduce in a thread-dependent order, so two uninterrupted runs differ by about
    1e-7 on average, and Adam turns that noise into larger moves on elements whose gradient is tiny (up to
    2e-5 seen on 2 ranks). A wrong resume (restarted Adam moments, other data, a stale queue) moves almost
    every element by about lr (5e-4 here) and fails both bounds.
    """
    assert a.keys() == b.keys()
    total, count = 0.0, 0
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        x, y = _key_bias_free(k, a[k]), _key_bias_free(k, b[k])
        if x is None or x.numel() == 0:
            continue
        d = (x.double() - y.double()).abs()
        assert d.max().item() <= max_atol, (k, d.max().item())
        total += d.sum().item()
        count += d.numel()
    assert total / count <= mean_atol, total / count


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ranks: int, *args: str) -> list[str]:
    """The command line of `torchrun --nproc_per_node <ranks> <args>` on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    return [*cmd, "--master_port", str(free_port()), *args]


def launch_deepspeed(
    ranks: int, args: list[str], *, threads: int | None = None
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus <ranks> ... --module albef_ds.cli <args>`: real ranks on this machine's CPU
    accelerator (gloo). threads: OMP_NUM_THREADS per rank (1 makes reductions deterministic)."""
    exe = Path(sys.executable).with_name("deepspeed")
    cmd = [
        str(exe),
        "--num_gpus",
        str(ranks),
        "--no_local_rank",
        "--master_port",
        str(free_port()),
        "--module",
        "albef_ds.cli",
        *args,
    ]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def signal_ranks_at(
    ranks: int, args: list[str], line_marker: str, *, timeout: float = 400
) -> tuple[int, str]:
    """Launch `deepspeed --num_gpus <ranks> --module albef_ds.cli <args>` (one thread per rank), send SIGUSR1
    to every rank (as srun delivers it to every task) once `line_marker` is logged; returns the launcher's
    exit status and its output."""
    import signal
    import time

    import psutil

    exe = Path(sys.executable).with_name("deepspeed")
    cmd = [str(exe), "--num_gpus", str(ranks), "--no_local_rank", "--master_port", str(free_port())]
    cmd += ["--module", "albef_ds.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline, seen = time.time() + timeout, []
    for line in proc.stdout:
        seen.append(line)
        if line_marker in line:
            procs = [
                c
                for c in psutil.Process(proc.pid).children(recursive=True)
                if "albef_ds.cli" in c.cmdline() and not any("deepspeed.launcher" in a for a in c.cmdline())
            ]
            assert len(procs) == ranks, [c.cmdline() for c in procs]
            for c in procs:
                c.send_signal(signal.SIGUSR1)
            break
        assert time.time() < deadline, "no training progress: " + "".join(seen[-20:])
    rest = proc.communicate(timeout=timeout)[0]
    return proc.returncode, "".join(seen) + rest


FT_CFG = str(ROOT / "configs/finetune_debug.yaml")


def tiny_synth_set(folder: Path, *, num_train: int = 64, num_eval: int = 10) -> list[str]:
    """`albef-ds data synth` of a tiny image-text set into `folder`; returns the overrides that point a
    debug-config run's data.* (train and eval lists, tokenizer) at it."""
    from albef_ds.cli import main

    ov = [
        f"data.synth.out_dir={folder}",
        f"data.synth.num_train={num_train}",
        f"data.synth.num_eval={num_eval}",
        f"data.train_file=[{folder / 'train.json'}]",
        f"data.eval_file={folder / 'eval.json'}",
        f"data.tokenizer={folder / 'vocab.txt'}",
    ]
    assert main(["data", "synth", "--config", str(ROOT / "configs/debug.yaml"), *ov]) == 0
    return ov


def small_karpathy_set(tmp: Path) -> list[str]:
    """96 training images (3 captions each) and 16 held-out ones (val + test) under `tmp`; returns the
    config overrides that point data.* and finetune.* at them, with a randomly initialised model (the
    mechanics, not the recall, are under test) and short evaluations (k_test 4)."""
    synth, kp = tmp / "synth", tmp / "kp"
    ov = [
        f"data.synth.out_dir={synth}",
        "data.synth.num_train=96",
        "data.synth.num_eval=16",
        f"data.tokenizer={synth / 'vocab.txt'}",
        "data.num_workers=0",
        f"finetune.train_file=[{kp / 'train.json'}]",
        f"finetune.val_file={kp / 'val.json'}",
        f"finetune.test_file={kp / 'test.json'}",
        "model.albef_init=",
        "train.batch_size=24",
        "train.tensorboard=false",
        "eval.k_test=4",
    ]
    from albef_ds.cli import main

    assert main(["data", "synth", "--config", FT_CFG, *ov]) == 0
    assert main(["data", "synth-retrieval", "--config", FT_CFG, *ov]) == 0
    return ov


@dataclass
class Pretrained:
    """A pre-training run the downstream tests start from."""

    synth: Path  # the synthetic image-text set (its vocab.txt is the model's tokenizer)
    run: Path  # the pre-training run folder (model.albef_init of the fine-tuning runs)
    common: list[str]  # overrides every downstream run shares (data set, tokenizer, workers)
    overrides: list[str]  # every override of the pre-training command (data files, output folder)
