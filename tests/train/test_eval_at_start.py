"""An evaluation before the first step changes nothing in the training that follows: it draws no random
numbers the training would have drawn (the grounding tests start from a pre-training run, and the same run
with and without `train.eval_at_start` used to give two different models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from albef_ds.cli import main
from tests.helpers import tiny_synth_set

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")


def _train_records(run: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["event"] == "train"}


def test_evaluation_at_start_leaves_the_training_unchanged(tmp_path):
    common = [
        *tiny_synth_set(tmp_path / "set", num_eval=16),
        "train.batch_size=8",
        "train.max_steps=4",
        "train.log_every=1",
        "train.eval_at_end=false",
        "train.tensorboard=false",
        "data.num_workers=0",
        "model.queue_size=16",
        "model.text.dropout=0.1",  # dropout draws from the torch RNG during training
    ]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a deterministic reduction order: equality measures the RNG, not threads
    try:
        for name, flag in (("plain", "false"), ("evaluated", "true")):
            args = ["pretrain", "--config", CFG, *common, f"train.output_dir={tmp_path / name}"]
            assert main([*args, f"train.eval_at_start={flag}"]) == 0
    finally:
        torch.set_num_threads(n)
    plain, evaluated = _train_records(tmp_path / "plain"), _train_records(tmp_path / "evaluated")
    assert sorted(plain) == sorted(evaluated) == [1, 2, 3, 4]
    recs = [json.loads(x) for x in (tmp_path / "evaluated" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval_val_before" for r in recs)  # the evaluation did run
    for step in plain:
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert evaluated[step][k] == pytest.approx(plain[step][k], abs=1e-6), (step, k)
