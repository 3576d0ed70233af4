"""One rank of the ZeRO-2 step audit (test_step_syncs.py runs it: `deepspeed --num_gpus 2`, CPU ranks).

For each DeepSpeed JSON variant it builds the tiny pre-training model through the trainer (as the benchmark
does), runs the trainer's own step (`Trainer.train_step`, the log window's per-step part and the lagged stop
vote) and records, per step: every collective (op, bytes, dtype, the albef_ds or DeepSpeed function that
issued it), every device-to-host read (tests/sync_check.py) and every call of DeepSpeed's accelerator
`synchronize`. Writes <out>/<variant>_rank<N>.json.

Variants: "default" (ds_configs/zero2_bf16.json, bf16, optim.grad_clip 0) and "no_checks" (the same with
bf16.check_grad_overflow=false and zero_optimization.compute_grad_norm=false).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.sync_check import HostReadRecorder  # noqa: E402

STEPS = 4  # the first one is a warm-up (DeepSpeed sets up its buckets and timers lazily)
COLLECTIVES = (
    "all_reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather",
    "broadcast",
    "reduce_scatter",
    "all_to_all_single",
)


def _payload(op: str, args: tuple, kwargs: dict):
    """The tensor a collective sends: its input (the second argument of the gathers and scatters, which
    take the output first), else its one tensor."""
    for key in ("input_tensor", "input", "tensor"):
        if torch.is_tensor(kwargs.get(key)):
            return kwargs[key]
    pos = (
        1 if op in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce_scatter") else 0
    )
    return args[pos] if len(args) > pos and torch.is_tensor(args[pos]) else None


class Audit:
    def __init__(self) -> None:
        self.rec = HostReadRecorder()
        self.rec.enabled = False
        self.step: int | None = None
        self.comms: list[dict] = []
        self.syncs: list[dict] = []

    def patch_collectives(self) -> None:
        """Wrap torch.distributed's collectives (DeepSpeed's comm layer calls them, and captures some at
        init_distributed: patch before it)."""
        for name in COLLECTIVES:
            original = getattr(dist, name)

            @functools.wraps(original)
            def wrapper(*args, _original=original, _name=name, **kwargs):
                if self.step is not None:
                    t = _payload(_name, args, kwargs)
                    f = sys._getframe(1)
                    while f is not None and f"deepspeed{os.sep}comm{os.sep}" in f.f_code.co_filename:
                        f = f.f_back  # DeepSpeed's comm wrappers: name the function that issued the call
                    owner, f = self.rec.owner(f)
                    self.comms.append(
                        {
                            "step": self.step,
                            "op": _name,
                            "bytes": t.numel() * t.element_size() if torch.is_tensor(t) else None,
                            "dtype": str(t.dtype) if torch.is_tensor(t) else None,
                            "owner": owner,
                            "function": f.f_code.co_name,
                            "where": f"{f.f_code.co_filename}:{f.f_lineno}",
                        }
                    )
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)

    def patch_synchronize(self) -> None:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        original = acc.synchronize

        def synchronize(*args, **kwargs):
            if self.step is not None:
                owner, f = self.rec.owner(sys._getframe(1))
                where = f"{f.f_code.co_filename}:{f.f_lineno}"
                self.syncs.append(
                    {"step": self.step, "owner": owner, "function": f.f_code.co_name, "where": where}
                )
            return original(*args, **kwargs)

        acc.synchronize = synchronize


def ds_json(variant: str, out: Path) -> Path:
    src = ROOT / "ds_configs/zero2_bf16.json"
    if variant == "default":
        return src
    ds = json.loads(src.read_text())
    ds["bf16"]["check_grad_overflow"] = False
    ds["zero_optimization"]["compute_grad_norm"] = False
    path = out / "zero2_bf16_no_checks.json"
    path.write_text(json.dumps(ds))
    return path


def run(variant: str, audit: Audit, out: Path) -> None:
    from albef_ds.config import load_config
    from albef_ds.tasks.pretrain import PretrainTask
    from albef_ds.train.monitor import LogWindow
    from albef_ds.train.trainer import Trainer
    from tests.helpers import SPECIAL, tiny_model_config

    cfg = load_config(
        None,
        [
            "train.engine=deepspeed",
            "train.batch_size=4",
            f"train.ds_config={ds_json(variant, out)}",
            "train.precision=bf16",
            "train.device=cpu",
            "optim.grad_clip=0",
            f"train.output_dir={out / variant}",
        ],
    )
    cfg.model = tiny_model_config(queue_size=16)
    cfg.model.text.max_position = 64  # the default vqa/data token limits must fit
    trainer = Trainer(cfg, PretrainTask(cfg))
    trainer.setup(with_data=False, tokens=SPECIAL)
    engine, model = trainer.engine, trainer.model
    model.train()
    g = torch.Generator().manual_seed(7 + engine.rank)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(5, 50, (4, 10), generator=g)
        ids[:, 0] = SPECIAL["cls"]
        image = torch.randn(4, 3, 32, 32, generator=g).to(engine.input_dtype)
        batches.append({"image": image, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    window = LogWindow(trainer.task.log_names, trainer.device, world_size=engine.world_size, start_step=0)
    audit.comms.clear()
    audit.syncs.clear()
    audit.rec.reads.clear()
    with audit.rec:
        for step in range(STEPS):
            audit.step = audit.rec.tag = step
            audit.rec.enabled = True
            outs = trainer.train_step(
                lr=1e-4, alpha=0.4, next_batch=functools.partial(batches.__getitem__, step)
            )
            for o in outs:
                window.add(o.logs, o.samples)
            window.step()
            engine.stop_vote(False)
            audit.rec.enabled = False
            audit.step = None
    engine.drain()
    losses = window.read(STEPS, STEPS, engine.rank)  # the log step's read, after the audited steps
    rep = {
        "rank": engine.rank,
        "variant": variant,
        "losses_finite": all(v == v for k, v in losses.items() if k.startswith("loss")),
        "comms": audit.comms,
        "syncs": audit.syncs,
        "reads": [
            {
                "step": r.tag,
                "method": r.method,
                "owner": r.owner,
                "function": r.function,
                "where": r.where,
                "stack": r.stack,
            }
            for r in audit.rec.reads
        ],
    }
    (out / f"{variant}_rank{engine.rank}.json").write_text(json.dumps(rep, indent=1))
    dist.barrier()


def main() -> None:
    from albef_ds.train.dist_env import world_info_from_env
    from albef_ds.train.engine import init_distributed

    out = Path(sys.argv[1])
    audit = Audit()
    audit.patch_collectives()
    init_distributed(world_info_from_env(), torch.device("cpu"))
    audit.patch_synchronize()
    for variant in ("default", "no_checks"):
        run(variant, audit, out)


if __name__ == "__main__":
    main()
