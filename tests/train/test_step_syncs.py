"""No hidden host syncs in the training step (issue 18).

CPU: the trainer's loop reads nothing from a tensor into Python between log steps (tests/sync_check.py
records every item/tolist/cpu/numpy/bool/float/int/index call made from albef_ds code); on two DeepSpeed
ranks the ZeRO-2 step's collectives and reads are the ones the README's performance section documents.
GPU: the same step under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import collections
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef_ds.config import load_config
from albef_ds.tasks.pretrain import PretrainTask
from albef_ds.train.monitor import LogWindow
from albef_ds.train.trainer import StepHooks, Trainer
from tests.helpers import SPECIAL, free_port, tiny_model_config, tiny_synth_set
from tests.sync_check import HostReadRecorder

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")
LOG_EVERY = 3
STEPS = 6


class StepTags(StepHooks):
    """Labels each recorded read with the step it happened in ("after" once training ends)."""

    def __init__(self, rec: HostReadRecorder) -> None:
        self.rec = rec

    def step_start(self, step: int) -> None:
        self.rec.tag = step

    def teardown(self) -> None:
        self.rec.tag = "after"


def test_fit_reads_nothing_to_the_host_between_log_steps(tmp_path):
    data = tiny_synth_set(tmp_path / "synth")
    cfg = load_config(
        CFG,
        [
            *data,
            f"train.output_dir={tmp_path / 'run'}",
            "train.engine=torch",
            "train.device=cpu",
            "train.batch_size=8",
            f"train.max_steps={STEPS}",
            f"train.log_every={LOG_EVERY}",
            "train.eval_at_start=false",
            "train.eval_at_end=false",
            "train.tensorboard=false",
            "data.num_workers=1",  # decoding happens in the loader's worker process, as in a real run
            "model.queue_size=40",  # the queue's ring write runs in the step too
            "model.vision.patch_dropout=0.5",  # and the patch draw
        ],
    )
    rec = HostReadRecorder()
    with rec:
        result = Trainer(cfg, PretrainTask(cfg), hooks=StepTags(rec)).fit()
    assert result["steps"] == STEPS
    ours = rec.reads_by("albef_ds")
    in_steps = {s: [r for r in ours if r.tag == s] for s in range(STEPS)}
    quiet = {s: reads for s, reads in in_steps.items() if (s + 1) % LOG_EVERY}
    assert not any(quiet.values()), "\n".join(str(r) for reads in quiet.values() for r in reads)
    # The log steps do read (the window's means, the temperature): the recorder sees the loop's reads.
    for s in range(LOG_EVERY - 1, STEPS, LOG_EVERY):
        assert {r.function for r in in_steps[s]} >= {"read", "log_extra"}, in_steps[s]


def test_stop_vote_builds_its_flag_without_a_host_copy():
    """The vote's flag is a fill on the device, not torch.tensor([flag], device=...) (on a GPU a pageable
    copy that waits for the stream); the lagged outcome is unchanged. One gloo rank in this process."""
    import torch.distributed as dist

    from albef_ds.train.engine import STOP_VOTE_LAG, DeepSpeedEngine

    eng = DeepSpeedEngine.__new__(DeepSpeedEngine)  # the vote only needs these (no model, no DeepSpeed)
    eng.device, eng._votes = torch.device("cpu"), collections.deque()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    rec = HostReadRecorder()
    try:
        with rec:
            got = [eng.stop_vote(flag) for flag in (False, True, False, False, False)]
        eng.drain()
    finally:
        dist.destroy_process_group()
    assert got == [False, False, False, True, False] and STOP_VOTE_LAG == 2
    ours = rec.reads_by("albef_ds")
    assert {r.function for r in ours} == {"_read_vote"}, "\n".join(map(str, ours))


@pytest.fixture(scope="module")
def zero2_audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncs")
    exe = Path(sys.executable).with_name("deepspeed")
    cmd = [str(exe), "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port())]
    cmd += [str(ROOT / "tests/train/ds_sync_worker.py"), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {
        v: [json.loads((out / f"{v}_rank{r}.json").read_text()) for r in (0, 1)]
        for v in ("default", "no_checks")
    }


def _after_warmup(items):
    return [x for x in items if x["step"] >= 1]


def _tiny(comms, owner):
    """(bytes, dtype, function) of `owner`'s collectives of a few bytes (flags, norms), sorted."""
    small = [c for c in comms if c["owner"] == owner and c["bytes"] is not None and c["bytes"] < 64]
    return sorted((c["bytes"], c["dtype"], c["function"]) for c in small)


def test_zero2_step_collectives_and_reads(zero2_audit):
    """What the README documents, per optimizer step after the first (bf16, optim.grad_clip 0, ZeRO-2, two
    weight-decay groups): DeepSpeed's 1 B overflow vote with its .item() and one 4 B gradient-norm
    all-reduce per group whose validity check is a bool(); ours: the stop vote's 4 B async all-reduce, read
    STOP_VOTE_LAG steps later; no device synchronize (the throughput timer is off)."""
    for rep in zero2_audit["default"]:
        assert rep["losses_finite"]
        steps = range(1, 4)
        ds = _tiny(_after_warmup(rep["comms"]), "deepspeed")
        per_step = [(1, "torch.uint8", "has_overflow")] + [(4, "torch.float32", "get_grad_norm_direct")] * 2
        assert ds == sorted(per_step * len(steps)), ds
        assert _tiny(_after_warmup(rep["comms"]), "albef_ds") == [(4, "torch.float32", "stop_vote")] * 3
        reads = _after_warmup(rep["reads"])
        ds_reads = {(r["function"], r["method"]) for r in reads if r["owner"] == "deepspeed"}
        assert ds_reads == {
            ("has_overflow", "item"),  # the overflow vote, read back
            ("is_invalid_grad_norm", "__bool__"),  # the norm's finiteness check
            ("mask_nan_or_inf_with_val_inplace", "torch.tensor"),  # a -1 built from Python per norm
        }, ds_reads
        ours = [r for r in reads if r["owner"] == "albef_ds"]
        # The only one: the stop vote of STOP_VOTE_LAG steps ago, from host memory (pinned, behind its own
        # event on a GPU): no wait for the steps queued since.
        assert {r["function"] for r in ours} == {"_read_vote"}, ours
        assert [r["step"] for r in ours] == [2, 3]
        assert rep["syncs"] == []


def test_zero2_without_overflow_check_and_grad_norm_has_no_tiny_collectives(zero2_audit):
    """bf16.check_grad_overflow=false and zero_optimization.compute_grad_norm=false remove both."""
    for rep in zero2_audit["no_checks"]:
        assert rep["losses_finite"]
        assert _tiny(_after_warmup(rep["comms"]), "deepspeed") == []
        assert [r for r in _after_warmup(rep["reads"]) if r["owner"] == "deepspeed"] == []


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_has_no_sync_on_a_gpu(tmp_path, patch_dropout):
    """The trainer's step (EMA, forward, backward, fused AdamW, enqueue) and the log window's per-step part,
    after two warm-up steps, under torch's sync detector: any synchronizing call raises."""
    cfg = load_config(
        None,
        [
            "train.engine=torch",
            "train.device=cuda",
            "train.batch_size=8",
            "train.precision=fp32",
            f"train.output_dir={tmp_path}",
        ],
    )
    cfg.model = tiny_model_config(queue_size=40)
    cfg.model.text.max_position = 64
    cfg.model.vision.patch_dropout = patch_dropout
    trainer = Trainer(cfg, PretrainTask(cfg))
    trainer.setup(with_data=False, tokens=SPECIAL)
    trainer.model.train()
    dev = trainer.device
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(5):
        ids = torch.randint(5, 50, (8, 10), generator=g)
        ids[:, 0] = SPECIAL["cls"]
        image = torch.randn(8, 3, 32, 32, generator=g)
        batches.append(
            {"image": image.to(dev), "input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev)}
        )
    window = LogWindow(trainer.task.log_names, dev, world_size=1, start_step=0)

    def step(i: int) -> None:
        outs = trainer.train_step(lr=1e-4, alpha=0.4, next_batch=functools.partial(batches.__getitem__, i))
        for o in outs:
            window.add(o.logs, o.samples)
        window.step()
        trainer.engine.stop_vote(False)

    for i in range(2):  # warm-up: kernel plans, autotuning, lazy optimizer state
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rec = window.read(5, 5, 0)
    assert all(rec[k] == rec[k] for k in trainer.task.log_names)
