"""Resumable fine-tuning: a run stopped mid-epoch (after a validation) and resumed ends exactly where an
uninterrupted run does: same losses step by step, same validation history and best epoch, same best
checkpoint, same test numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from albef_ds.cli import main
from albef_ds.train.runtime import EXIT_PREEMPTED
from tests.helpers import assert_same_state, small_karpathy_set

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/finetune_debug.yaml")
STEPS, PER_EPOCH = 24, 12  # 96 images x 3 captions / batch 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft_resume")
    ov = small_karpathy_set(tmp) + [
        "model.text.dropout=0.1",  # dropout draws from the RNG: its state must come back on resume
        f"train.max_steps={STEPS}",
        "train.epochs=2",
        "train.log_every=1",
        "loss.alpha_ramp_steps=10",
    ]
    return tmp, ov


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # deterministic reductions: the comparison measures the resume, not the scheduler
    yield
    torch.set_num_threads(n)


def _finetune(ov, run: Path, *extra: str) -> int:
    return main(["finetune", "retrieval", "--config", CFG, *ov, f"train.output_dir={run}", *extra])


def _train(run: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["event"] == "train"}


def test_resumed_finetuning_equals_uninterrupted(data, one_thread):
    tmp, ov = data
    straight, resumed = tmp / "straight", tmp / "resumed"
    assert _finetune(ov, straight) == 0
    # Stop in the second epoch, after the first validation (best epoch 0 is already on disk).
    assert _finetune(ov, resumed, "train.stop_at_step=17", "train.save_every=5") == EXIT_PREEMPTED
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000017"
    assert not (resumed / "results.json").exists()
    assert _finetune(ov, resumed, "train.resume=auto") == 0
    a, b = _train(straight), _train(resumed)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(18, STEPS + 1):
        for k in ("loss", "loss_itc", "loss_itm"):
            assert b[step][k] == pytest.approx(a[step][k], abs=1e-6), (step, k)
    ra = json.loads((straight / "results.json").read_text())
    rb = json.loads((resumed / "results.json").read_text())
    assert rb["resumed_from"] == "step_00000017"
    assert [v["step"] for v in rb["history"]] == [PER_EPOCH, STEPS]
    assert (rb["best_epoch"], rb["best_step"]) == (ra["best_epoch"], ra["best_step"])
    for va, vb in zip(ra["history"], rb["history"]):
        assert vb["r_mean"] == pytest.approx(va["r_mean"], abs=1e-6)
    for k in ("txt_r1", "img_r1", "r_mean", "itc_r_mean"):
        assert rb["test"][k] == pytest.approx(ra["test"][k], abs=1e-6), k
    sa = torch.load(straight / "checkpoint_best.pt", weights_only=True)["model"]
    sb = torch.load(resumed / "checkpoint_best.pt", weights_only=True)["model"]
    assert_same_state(sa, sb)
