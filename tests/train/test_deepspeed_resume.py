"""DeepSpeed ZeRO-2 resume on 2 CPU ranks: exact continuation, and the 2-rank checkpoint on 1 rank."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from albef_ds.cli import main
from albef_ds.train.runtime import EXIT_PREEMPTED
from tests.helpers import assert_same_state, launch_deepspeed

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")


def _launch(ranks: int, overrides: list[str]) -> subprocess.CompletedProcess:
    # One intra-op thread per rank: deterministic reductions, so a resumed run can match to 1e-6.
    return launch_deepspeed(
        ranks, ["pretrain", "--config", CFG, "train.engine=deepspeed", *overrides], threads=1
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dsresume")
    d = tmp / "synth"
    assert (
        main(
            [
                "data",
                "synth",
                "--config",
                CFG,
                f"data.synth.out_dir={d}",
                "data.synth.num_train=128",
                "data.synth.num_eval=10",
            ]
        )
        == 0
    )
    common = [
        f"data.train_file=[{d / 'train.json'}]",
        f"data.eval_file={d / 'eval.json'}",
        f"data.tokenizer={d / 'vocab.txt'}",
        "train.batch_size=16",
        "train.max_steps=10",
        "train.log_every=1",
        "train.eval_at_start=false",
        "train.eval_at_end=false",
        "data.num_workers=1",
        "model.queue_size=20",
    ]  # 128 pairs / (16 x 2 ranks) = 4 steps per epoch: 10 steps cross two epoch boundaries
    straight, resumed = tmp / "straight", tmp / "resumed"
    out = _launch(2, [*common, f"train.output_dir={straight}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = _launch(2, [*common, f"train.output_dir={resumed}", "train.stop_at_step=5"])
    assert out.returncode == EXIT_PREEMPTED, out.stdout[-3000:] + out.stderr[-3000:]
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    for r in (0, 1):  # the rank reports written at the stop (the resumed run overwrites them)
        shutil.copy(resumed / f"rank{r}.json", tmp / f"stop5_rank{r}.json")
    out = _launch(2, [*common, f"train.output_dir={resumed}", "train.resume=auto"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp, common, straight, resumed


def _train(run: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["event"] == "train"}


def test_two_rank_resume_continues_exactly(runs):
    _, _, straight, resumed = runs
    a, b = _train(straight), _train(resumed)
    assert sorted(b) == list(range(1, 11))
    for step in range(6, 11):
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert b[step][k] == pytest.approx(a[step][k], abs=1e-6), (step, k)
    sa = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    sb = torch.load(resumed / "checkpoint.pt", weights_only=True)["model"]
    assert_same_state(sa, sb)  # at the CPU noise floor: see tests/helpers.py
    r0, r1 = (json.loads((resumed / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["momentum_sha256"] == r1["momentum_sha256"] and r0["queue_sha256"] == r1["queue_sha256"]


def _copy_latest(src_run: Path, dst_run: Path) -> str:
    (dst_run / "checkpoints").mkdir(parents=True)
    src = src_run / "checkpoints"
    tag = (src / "latest").read_text().strip()
    shutil.copytree(src / tag, dst_run / "checkpoints" / tag)
    (dst_run / "checkpoints" / "latest").write_text(tag + "\n")
    return tag


def test_two_rank_checkpoint_resumes_on_one_rank(runs):
    tmp, common, _, resumed = runs
    one = tmp / "one"
    tag = _copy_latest(resumed, one)
    assert tag == "step_00000005"
    out = _launch(1, [*common, f"train.output_dir={one}", "train.resume=auto", "train.max_steps=14"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "resuming a 2-rank checkpoint on 1 ranks" in log
    assert "loaded the universal checkpoint" in log
    assert (one / "checkpoints" / "universal" / tag / "zero").is_dir()
    t = _train(one)
    assert sorted(t) == list(range(6, 15))  # continues at step 6 on one rank
    last_two_rank = _train(resumed)[5]["loss"]
    for step in range(6, 15):
        assert math.isfinite(t[step]["loss"])
        assert abs(t[step]["loss"] - last_two_rank) < 0.25 * last_two_rank  # continuous, not a restart


def test_universal_resume_carries_weights_adam_moments_and_buffers(runs):
    """Load the 2-rank step-5 checkpoint on 1 rank and stop at once (max_steps=5): the one rank then holds
    all of the AdamW moments that the two ranks held between them (the same total, not fresh zeros), the
    weights of the checkpoint, and its momentum encoders, queues and pointer (a universal load alone
    leaves buffers at their initial values: DeepSpeed pitfall 5)."""
    tmp, common, _, resumed = runs
    zero = tmp / "zero_steps"
    tag = _copy_latest(resumed, zero)
    out = _launch(1, [*common, f"train.output_dir={zero}", "train.resume=auto", "train.max_steps=5"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    two = [json.loads((tmp / f"stop5_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["steps"] == 5 for r in two)  # the reports written at the stop, next to the checkpoint
    one = json.loads((zero / "rank0.json").read_text())
    assert one["optimizer_state_numel"] >= 2 * one["trainable_params"]  # exp_avg + exp_avg_sq, all of it
    total = sum(r["optimizer_state_abs_sum"] for r in two)
    assert total > 0
    assert one["optimizer_state_abs_sum"] == pytest.approx(total, rel=1e-6)
    assert one["momentum_sha256"] == two[0]["momentum_sha256"]
    assert one["queue_sha256"] == two[0]["queue_sha256"] and one["queue_ptr"] == two[0]["queue_ptr"]
    saved = torch.load(
        zero / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
    )["module"]
    final = torch.load(zero / "checkpoint.pt", weights_only=True)["model"]
    assert final.keys() == saved.keys()
    for k in saved:
        assert torch.equal(final[k], saved[k].to(final[k].dtype)), k
