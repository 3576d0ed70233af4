"""One fine-tuning task's training step on the trainer, timed: samples/s and peak memory (JSON).

    python benchmarks/bench_task_step.py --task nlvr2 --config configs/nlvr2.yaml \
        --out results/nlvr2_step.json train.engine=deepspeed   # ALBEF-base, 384 px, batch 16, bf16 ZeRO-2

The task's own model, engine (ZeRO-2 under deepspeed) and `Trainer.train_step`, randomly initialised
(`model.*_init` cleared: speed only), on synthetic batches of the task's batch dict already on the device
(the loader is not timed). Tasks: nlvr2 (two images per sample) and ve. One process; under deepspeed set
MASTER_PORT or let the script pick a free one. `--dry-run`-sized runs use configs/nlvr2_debug.yaml on a CPU
(tests/bench/test_bench_task_step.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from albef_ds.bench.throughput import synthetic_batches as random_batches  # noqa: E402
from albef_ds.config import load_config  # noqa: E402
from albef_ds.tasks import make_task  # noqa: E402
from albef_ds.train.monitor import peak_memory_gb  # noqa: E402
from albef_ds.train.trainer import Trainer  # noqa: E402

TASKS = ("nlvr2", "ve")
TOKENS = {"pad": 0, "cls": 2, "mask": 4}


def synthetic_batches(task: str, cfg, batch: int, device, dtype, n: int = 2) -> list[dict]:
    """`n` batches of the task's batch dict: random images, token ids with [CLS] first, labels."""
    images = ("image0", "image1") if task == "nlvr2" else ("image",)
    classes = 2 if task == "nlvr2" else 3
    return random_batches(cfg, batch, device, dtype, n, images=images, classes=classes)


def bench_task_step(task: str, cfg, *, warmup: int, steps: int) -> dict:
    if task not in TASKS:
        raise SystemExit(f"--task must be one of {TASKS}, got {task!r}")
    if steps < 1 or warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    cfg.model.vit_init = cfg.model.bert_init = cfg.model.albef_init = ""  # random init: speed only
    cfg.train.grad_accum, cfg.train.global_batch_size = 1, 0
    if cfg.train.engine == "deepspeed" and "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    trainer = Trainer(cfg, make_task(task, cfg))
    trainer.setup(with_data=False, tokens=TOKENS)
    trainer.model.train()
    device, batch = trainer.device, cfg.train.batch_size
    data = synthetic_batches(task, cfg, batch, device, trainer.engine.input_dtype)
    losses, t0 = [], 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
        outs = trainer.train_step(
            lr=cfg.optim.lr, alpha=cfg.loss.alpha, next_batch=lambda k=i: data[k % len(data)]
        )
        if i >= warmup:
            losses.append(float(outs[-1].loss.detach()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - t0) / steps
    if not all(v == v and abs(v) != float("inf") for v in losses):
        raise FloatingPointError(f"non-finite loss in the {task} step benchmark: {losses}")
    return {
        "task": task,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "engine": cfg.train.engine,
        "precision": cfg.train.precision,
        "image_size": cfg.model.vision.image_size,
        "batch_per_device": batch,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "warmup": warmup,
        "steps": steps,
        "step_time_s": step_s,
        "samples_per_s": batch / step_s,
        "peak_mem_gb": peak_memory_gb(device),
        "mean_loss": sum(losses) / len(losses),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    res = bench_task_step(args.task, cfg, warmup=args.warmup, steps=args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
