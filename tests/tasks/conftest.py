"""The pre-trained debug model the downstream tasks start from: a short `albef-ds pretrain` of
configs/debug.yaml on a small synthetic set (the demo's recipe, 400 steps instead of 800), made once per
test session. The full demo pre-training (`demo_pretrained`) is in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from albef_ds.cli import main
from tests.helpers import Pretrained

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Pretrained:
    tmp = tmp_path_factory.mktemp("pretrained")
    synth = tmp / "synth"
    common = [
        f"data.synth.out_dir={synth}",
        "data.synth.num_train=600",
        "data.synth.num_eval=120",
        f"data.tokenizer={synth / 'vocab.txt'}",
        "data.num_workers=0",
        "train.tensorboard=false",
    ]
    pre = [
        *common,
        f"data.train_file=[{synth / 'train.json'}]",
        f"data.eval_file={synth / 'eval.json'}",
        f"train.output_dir={tmp / 'pre'}",
        "train.max_steps=400",
        "train.eval_at_start=false",
    ]
    dbg = str(ROOT / "configs/debug.yaml")
    assert main(["data", "synth", "--config", dbg, *pre]) == 0
    assert main(["pretrain", "--config", dbg, *pre]) == 0
    return Pretrained(synth, tmp / "pre", common, pre)
