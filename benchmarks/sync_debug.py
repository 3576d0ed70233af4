"""Pre-training steps under CUDA's sync debug mode: every synchronizing CUDA call a step makes, with the
Python line that made it, as JSON.

    python benchmarks/sync_debug.py --config configs/pretrain_4m.yaml train.batch_size=64 \
        train.precision=bf16 train.ds_config=ds_configs/zero2_bf16.json --out DIR/sync_debug.json

It builds the benchmark's "ours" recipe (`albef_ds.bench.throughput.build_recipe`: the trainer's own step,
synthetic batches already on the device), runs `--warmup` steps, then `--steps` steps with
`torch.cuda.set_sync_debug_mode("warn")`. Each warning is recorded with its innermost Python frame outside
torch and attributed to its owner: albef_ds (ours: should be none between log steps), deepspeed (the two
documented in the README: the overflow vote's `.item()` and the gradient norm's checks) or other. On a
machine without CUDA the same steps run and the mode is reported unavailable (the `--dry-run` of
`benchmarks/gpu_check.sh`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _owner(frames: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(owner, "file:line function") of the innermost frame that is not torch's own."""
    for f in reversed(frames):
        name = f.filename.replace("\\", "/")
        if "/torch/" in name or name.endswith(("sync_debug.py", "/warnings.py")):
            continue
        owner = "albef_ds" if "/albef_ds/" in name else "deepspeed" if "/deepspeed/" in name else "other"
        short = name.split("/site-packages/")[-1].split("/albef_ds/")[-1]
        return owner, f"{short}:{f.lineno} {f.name}"
    return "torch", "?"


def run(cfg, *, warmup: int, steps: int, out: Path) -> dict:
    from albef_ds.bench.throughput import build_recipe
    from albef_ds.train.dist_env import world_info_from_env
    from albef_ds.train.engine import init_distributed
    from albef_ds.train.runtime import resolve_device

    info = world_info_from_env()
    device = resolve_device(cfg.train.device, info.local_rank)
    if cfg.train.engine == "deepspeed":
        init_distributed(info, device)
    trainer, c, data = build_recipe(cfg, "ours", device)
    cuda = device.type == "cuda"
    calls: list[dict] = []

    def record(message, category, filename, lineno, file=None, line=None):
        owner, where = _owner(traceback.extract_stack()[:-1])
        calls.append({"step": current[0], "owner": owner, "where": where, "message": str(message)[:200]})

    current = [0]
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        current[0] = i + 1
        pick = functools.partial(data.__getitem__, i % len(data))
        timed = i >= warmup
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record if timed else warnings.showwarning
            if timed and cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_step(lr=c.optim.warmup_lr, alpha=0.4, next_batch=pick)
            finally:
                if timed and cuda:
                    torch.cuda.set_sync_debug_mode("default")
    if cuda:
        torch.cuda.synchronize(device)
    by_owner = collections.Counter(x["owner"] for x in calls)
    by_where = collections.Counter(f"{x['owner']}: {x['where']}" for x in calls)
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "sync_debug_mode": "warn" if cuda else "unavailable (no CUDA device): the steps ran without it",
        "engine": c.train.engine,
        "precision": c.train.precision,
        "batch_per_device": c.train.batch_size,
        "warmup": warmup,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "syncs": len(calls),
        "syncs_per_step": len(calls) / steps,
        "by_owner": dict(by_owner),
        "by_site": dict(by_where.most_common()),
        "ours_per_step": by_owner.get("albef_ds", 0) / steps,
    }
    if info.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/pretrain_4m.yaml"))
    ap.add_argument("--engine", choices=["deepspeed", "torch"], default="deepspeed")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sync_debug.json")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = ap.parse_args(argv)
    from albef_ds.config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.train.engine = args.engine
    res = run(cfg, warmup=args.warmup, steps=args.steps, out=args.out)
    print(
        f"[sync debug] {res['device']}: {res['syncs_per_step']:.1f} synchronizing calls per step "
        f"({res['by_owner'] or 'none'}); mode {res['sync_debug_mode']}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
