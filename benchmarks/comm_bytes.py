"""Measure the bytes of every torch.distributed collective of a real multi-rank DeepSpeed ZeRO-2 pre-training.

Usage (2 CPU ranks, gloo, the debug config by default):

    python benchmarks/comm_bytes.py --config configs/debug.yaml --steps 4 \
        --out benchmarks/results/comm_bytes_debug.json [key=value overrides ...]

The driver generates a small synthetic data set, launches `deepspeed --num_gpus <ranks> --no_local_rank
benchmarks/comm_bytes.py _worker ...`, and each rank runs the real pre-training task on the one trainer
with counting wrappers installed on torch.distributed *before* deepspeed is imported or its communication
backend is built (DeepSpeed's TorchBackend keeps references to `all_gather_into_tensor` and
`reduce_scatter_tensor` from the moment it is created, so later patches would miss them).

Every call is recorded with its op, element count, dtype, payload bytes and the call site (the first frame
outside torch and deepspeed.comm), and attributed to a phase: `startup` (before the first optimizer step:
parameter and buffer broadcasts, rendezvous), `step <k>` (from the trainer's `step_start` hook of one
optimizer step to the next) or `teardown` (from its `teardown` hook on: the final fp32 gather, barriers).
Only the steps count as per-step traffic.

Payload convention (per rank, per call): the size of the full logical buffer of the collective --
all_reduce / reduce / broadcast: the tensor; all_gather / all_gather_into_tensor: the gathered output
(world x input); reduce_scatter: the input; all_to_all: the input. What each rank then sends on the wire
depends on the algorithm; `benchmarks/scaling_model.py` turns payloads into wire bytes and time.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = "_worker"

# torch.distributed functions that move data (or synchronise); wrapped on torch.distributed and on
# torch.distributed.distributed_c10d (the same function objects; both names are looked up by callers).
OPS = (
    "all_reduce",
    "reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all_single",
    "all_to_all",
    "all_reduce_coalesced",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "barrier",
    "monitored_barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
)

# call site (file suffix, function) -> the purpose it serves in a ZeRO-2 ALBEF step
PURPOSES = {
    ("deepspeed/runtime/zero/stage_1_and_2.py", "allreduce_bucket"): "grad_reduce",
    ("deepspeed/runtime/zero/stage_1_and_2.py", "gradient_reduction_w_predivide"): "grad_reduce",
    ("deepspeed/runtime/utils.py", "all_gather_into_tensor_dp_groups"): "param_allgather",
    ("deepspeed/runtime/utils.py", "all_gather_dp_groups"): "param_allgather",
    ("deepspeed/runtime/zero/stage_1_and_2.py", "get_grad_norm_direct"): "grad_norm",
    ("deepspeed/runtime/zero/stage_1_and_2.py", "has_overflow"): "overflow_check",
    ("albef_ds/train/comm.py", "gather_padded"): "queue_allgather",  # the queue's padded all-gather
    ("albef_ds/train/engine.py", "stop_vote"): "stop_vote",
}


# ----------------------------------------------------------------------------------------------------------
# worker side: counting wrappers


def _nbytes(x) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _numel(x) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(t) for t in x)
    return 0


def _dtype(x) -> str | None:
    import torch

    if isinstance(x, torch.Tensor):
        return str(x.dtype).replace("torch.", "")
    if isinstance(x, (list, tuple)) and x:
        return _dtype(x[0])
    return None


def _payload(op: str, args: tuple, kwargs: dict):
    """(payload tensor(s), input tensor(s)) of a call, by the torch.distributed signature of `op`."""

    def arg(i: int, *names: str):
        for n in names:
            if n in kwargs:
                return kwargs[n]
        return args[i] if len(args) > i else None

    if op in ("all_reduce", "reduce", "broadcast", "send", "recv", "isend", "irecv"):
        t = arg(0, "tensor")
        return t, t
    if op == "all_reduce_coalesced":
        t = arg(0, "tensors")
        return t, t
    if op == "all_gather":
        return arg(0, "tensor_list"), arg(1, "tensor")
    if op in ("all_gather_into_tensor", "_all_gather_base"):
        return arg(0, "output_tensor"), arg(1, "input_tensor")
    if op == "reduce_scatter":
        return arg(1, "input_list"), arg(1, "input_list")
    if op in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return arg(1, "input"), arg(1, "input")
    if op == "all_to_all_single":
        return arg(1, "input"), arg(1, "input")
    if op == "all_to_all":
        return arg(1, "input_tensor_list"), arg(1, "input_tensor_list")
    if op == "gather":
        return arg(0, "tensor"), arg(0, "tensor")
    if op == "scatter":
        return arg(1, "scatter_list"), arg(0, "tensor")
    return None, None  # barriers and object collectives: no tensor payload we can size


def _call_site() -> tuple[str, str]:
    """(path, function) of the first frame outside torch, deepspeed.comm and this file."""
    f = sys._getframe(2)
    skip = ("/torch/", "/deepspeed/comm/", os.path.basename(__file__))
    while f is not None:
        fn = f.f_code.co_filename
        if not any(s in fn for s in skip) and not fn.startswith("<"):
            if "/albef_ds/" in fn:  # our package, wherever the venv's editable install points
                fn = "albef_ds/" + fn.split("/albef_ds/", 1)[1]
            for anchor in ("site-packages/", str(ROOT) + "/"):
                if anchor in fn:
                    fn = fn.split(anchor, 1)[1]
                    break
            return fn, f.f_code.co_name
        f = f.f_back
    return "?", "?"


class Recorder:
    """Wraps the torch.distributed collectives and logs every outermost call (object collectives that
    call tensor collectives inside count once, as themselves)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.phase = "startup"
        self.step = -1
        self._local = threading.local()

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for op in OPS:
            fn = getattr(dist, op, None)
            if fn is None or getattr(fn, "_albef_counted", False):
                continue
            wrapped = self._wrap(op, fn)
            setattr(dist, op, wrapped)
            if getattr(c10d, op, None) is fn:
                setattr(c10d, op, wrapped)

    def _wrap(self, op: str, fn):
        rec = self

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(rec._local, "depth", 0)
            if depth == 0:
                payload, inp = _payload(op, args, kwargs)
                path, func = _call_site()
                rec.records.append(
                    {
                        "phase": rec.phase,
                        "step": rec.step,
                        "op": op,
                        "numel": _numel(payload),
                        "input_numel": _numel(inp),
                        "dtype": _dtype(payload),
                        "bytes": _nbytes(payload),
                        "site": f"{path}:{func}",
                        "purpose": PURPOSES.get((path, func), "other"),
                        "async": bool(kwargs.get("async_op", False)),
                    }
                )
            rec._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                rec._local.depth = depth

        counted._albef_counted = True
        return counted

    def mark_step(self) -> None:
        self.step += 1
        self.phase = "step"

    def mark_teardown(self) -> None:
        self.phase = "teardown"


def _worker(out_dir: str, cli_args: list[str]) -> int:
    """One rank: the real pre-training on the one trainer, its step boundaries marked by the trainer's
    hooks. cli_args: `--config FILE key=value ...`."""
    rec = Recorder()
    rec.install()  # before anything imports deepspeed (see the module docstring)
    from albef_ds.config import load_config
    from albef_ds.tasks import train_task
    from albef_ds.train.trainer import StepHooks

    class PhaseHooks(StepHooks):
        def step_start(self, step: int) -> None:  # before every optimizer step of the trainer
            rec.mark_step()

        def teardown(self) -> None:  # once, after the last step
            rec.mark_teardown()

    rc = 1
    try:
        cfg = load_config(cli_args[1], cli_args[2:])
        result = train_task(cfg, "pretrain", hooks=PhaseHooks())
        rc = 0 if result["steps"] > 0 else 1
    finally:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, f"comm_rank{rank}.json").write_text(
            json.dumps({"rank": rank, "world_size": world, "rc": rc, "records": rec.records})
        )
    return rc


# ----------------------------------------------------------------------------------------------------------
# driver side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summarise(records: list[dict]) -> dict:
    """{op: calls, bytes} and {purpose: calls, bytes} of a list of records, with totals."""
    by_op: dict = collections.defaultdict(lambda: {"calls": 0, "bytes": 0})
    by_purpose: dict = collections.defaultdict(lambda: {"calls": 0, "bytes": 0})
    for r in records:
        for table, key in ((by_op, r["op"]), (by_purpose, r["purpose"])):
            table[key]["calls"] += 1
            table[key]["bytes"] += r["bytes"]
    return {
        "by_op": dict(sorted(by_op.items())),
        "by_purpose": dict(sorted(by_purpose.items())),
        "total_bytes": sum(r["bytes"] for r in records),
        "calls": len(records),
    }


def _signature(records: list[dict]) -> list[tuple]:
    return [(r["op"], r["numel"], r["dtype"], r["site"]) for r in records]


def aggregate(rank_files: list[dict], *, skip_first: int = 1) -> dict:
    """Per-step traffic from every rank's records: the steps after the first `skip_first` must all carry
    the same collectives (checked); their common list is the per-step figure."""
    world = rank_files[0]["world_size"]
    out: dict = {"world_size": world, "ranks": {}}
    per_rank_steps = []
    for rf in rank_files:
        recs = rf["records"]
        steps = sorted({r["step"] for r in recs if r["phase"] == "step"})
        by_step = {s: [r for r in recs if r["phase"] == "step" and r["step"] == s] for s in steps}
        per_rank_steps.append(by_step)
        out["ranks"][rf["rank"]] = {
            "startup": _summarise([r for r in recs if r["phase"] == "startup"]),
            "teardown": _summarise([r for r in recs if r["phase"] == "teardown"]),
            "step_total_bytes": [sum(r["bytes"] for r in by_step[s]) for s in steps],
        }
    steps = sorted(per_rank_steps[0])
    if len(steps) <= skip_first:
        raise ValueError(f"need more than {skip_first} recorded steps, got {len(steps)}")
    steady = steps[skip_first:]
    ref = per_rank_steps[0][steady[0]]
    consistent = all(
        _signature(prs[s]) == _signature(ref) for prs in per_rank_steps for s in steady if s in prs
    ) and all(set(prs) == set(per_rank_steps[0]) for prs in per_rank_steps)
    out["steps_recorded"] = len(steps)
    out["steady_steps"] = steady
    out["steady_steps_identical"] = consistent
    out["first_step_same_as_steady"] = all(
        _signature(prs[steps[0]]) == _signature(ref) for prs in per_rank_steps
    )
    out["per_step"] = _summarise(ref)
    out["per_step_calls"] = [
        {k: r[k] for k in ("op", "numel", "dtype", "bytes", "site", "purpose", "async")} for r in ref
    ]
    return out


def measure(
    config: str | Path = ROOT / "configs/debug.yaml",
    overrides: list[str] | tuple[str, ...] = (),
    *,
    ranks: int = 2,
    steps: int = 4,
    batch_size: int = 8,
    grad_accum: int = 1,
    ds_config: str | Path = ROOT / "ds_configs/zero2_cpu.json",
    reduce_bucket_size: int | None = None,
    allgather_bucket_size: int | None = None,
    workdir: str | Path | None = None,
    timeout: float = 900.0,
) -> dict:
    """Run `ranks` DeepSpeed ranks of `albef-ds pretrain` for `steps` optimizer steps on generated data and
    return the per-step collective traffic (see `aggregate`) with the run's settings."""
    from albef_ds.cli import main
    from albef_ds.config import load_config
    from albef_ds.train.ds_config import build_ds_config

    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first step is reported apart), got {steps}")
    own_tmp = workdir is None
    tmp = Path(tempfile.mkdtemp(prefix="comm_bytes_")) if own_tmp else Path(workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        ds_path = Path(ds_config)
        if reduce_bucket_size is not None or allgather_bucket_size is not None:
            ds = json.loads(ds_path.read_text())
            z = ds.setdefault("zero_optimization", {})
            if reduce_bucket_size is not None:
                z["reduce_bucket_size"] = int(reduce_bucket_size)
            if allgather_bucket_size is not None:
                z["allgather_bucket_size"] = int(allgather_bucket_size)
            ds_path = tmp / "ds_config.json"
            ds_path.write_text(json.dumps(ds, indent=1))
        synth = tmp / "synth"
        pairs = max(64, ranks * batch_size * grad_accum * (steps + 1))
        vocab = load_config(
            config, list(overrides)
        ).model.text.vocab_size  # the tokenizer must match the model
        data_ov = [
            f"data.synth.out_dir={synth}",
            f"data.synth.num_train={pairs}",
            "data.synth.num_eval=8",
            f"data.synth.vocab_size={vocab}",
            f"data.train_file=[{synth / 'train.json'}]",
            f"data.eval_file={synth / 'eval.json'}",
            f"data.tokenizer={synth / 'vocab.txt'}",
        ]
        if main(["data", "synth", "--config", str(config), *data_ov, *overrides]) != 0:
            raise RuntimeError("albef-ds data synth failed")
        run_ov = [
            *data_ov,
            "train.engine=deepspeed",
            f"train.ds_config={ds_path}",
            f"train.output_dir={tmp / 'run'}",
            f"train.max_steps={steps}",
            f"train.batch_size={batch_size}",
            f"train.grad_accum={grad_accum}",
            "train.global_batch_size=0",
            "train.eval_at_start=false",
            "train.eval_at_end=false",
            "train.tensorboard=false",
            f"train.log_every={steps}",
            "data.num_workers=0",
            *overrides,
        ]
        cfg = load_config(config, run_ov)
        ds_used = build_ds_config(cfg, world_size=ranks)
        rec_dir = tmp / "records"
        cmd = [
            str(Path(sys.executable).with_name("deepspeed")),
            "--num_gpus",
            str(ranks),
            "--no_local_rank",
            "--master_port",
            str(_free_port()),
            str(Path(__file__).resolve()),
            WORKER,
            str(rec_dir),
            "--config",
            str(config),
            *run_ov,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        print(
            f"[comm_bytes] launching {ranks} ranks x {steps} steps: {' '.join(cmd[:6])} ...", file=sys.stderr
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(
                f"the {ranks}-rank run failed (status {proc.returncode}):\n"
                + proc.stdout[-3000:]
                + proc.stderr[-3000:]
            )
        files = [json.loads((rec_dir / f"comm_rank{r}.json").read_text()) for r in range(ranks)]
        result = aggregate(files)
        report0 = json.loads((tmp / "run" / "rank0.json").read_text())
        result.update(
            {
                "config": _rel(config),
                "overrides": list(overrides),
                "steps": steps,
                "batch_size_per_rank": batch_size,
                "grad_accum": grad_accum,
                "queue_size": cfg.model.queue_size,
                "embed_dim": cfg.model.embed_dim,
                "trainable_params": report0.get("trainable_params"),
                "ds_config": ds_used,
                "wall_s": wall,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "versions": _versions(),
            }
        )
        return result
    finally:
        if own_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _rel(path: str | Path) -> str:
    """The path relative to the repository root when it lies inside it (results stay portable)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _versions() -> dict:
    import deepspeed
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": sys.version.split()[0]}


def _print_summary(res: dict) -> None:
    ps = res["per_step"]
    print(
        f"per optimizer step, per rank ({res['world_size']} ranks, "
        f"{res['trainable_params']} trainable params, steps identical: {res['steady_steps_identical']}):"
    )
    for purpose, v in ps["by_purpose"].items():
        print(f"  {purpose:16s} {v['calls']:3d} calls  {v['bytes']:>14,d} B")
    print(f"  {'total':16s} {ps['calls']:3d} calls  {ps['total_bytes']:>14,d} B")
    su = res["ranks"][0]["startup"] if 0 in res["ranks"] else next(iter(res["ranks"].values()))["startup"]
    print(f"  (start-up, excluded: {su['calls']} calls, {su['total_bytes']:,d} B)")


def cli(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == WORKER:
        return _worker(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", default=str(ROOT / "configs/debug.yaml"), help="experiment YAML (default debug)"
    )
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is reported apart)")
    ap.add_argument("--batch-size", type=int, default=8, help="micro-batch per rank")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--ds-config", default=str(ROOT / "ds_configs/zero2_cpu.json"))
    ap.add_argument("--reduce-bucket-size", type=int, default=None, help="override the JSON's value")
    ap.add_argument("--allgather-bucket-size", type=int, default=None, help="override the JSON's value")
    ap.add_argument("--out", default="", help="write the result JSON here")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    a = ap.parse_args(argv)
    res = measure(
        a.config,
        a.overrides,
        ranks=a.ranks,
        steps=a.steps,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        ds_config=a.ds_config,
        reduce_bucket_size=a.reduce_bucket_size,
        allgather_bucket_size=a.allgather_bucket_size,
    )
    _print_summary(res)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
