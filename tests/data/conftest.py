"""Shared fixtures for the data-layer tests: a trained vocabulary and a tiny synthetic set (built once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from albef_ds.config import SynthConfig
from albef_ds.data import generate_synthetic, train_wordpiece_vocab

CAPTIONS = [
    "a large red circle at the top",
    "small blue square in the middle of a striped background",
    "there is a yellow triangle near the bottom on a checkered grey background",
    "a picture of a green diamond on a teal background",
    "the cross is purple and small",
    "an orange circle at the bottom of a dotted beige background",
]


@pytest.fixture(scope="session")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_wordpiece_vocab(CAPTIONS * 5, tmp_path_factory.mktemp("vocab") / "vocab.txt", vocab_size=200)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> SynthConfig:
    cfg = SynthConfig(
        out_dir=str(tmp_path_factory.mktemp("synth") / "set"), num_train=64, num_eval=8, image_size=48, seed=3
    )
    generate_synthetic(cfg, progress=False)
    return cfg
