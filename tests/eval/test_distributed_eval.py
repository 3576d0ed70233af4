"""`albef-ds evaluate retrieval` on 2 ranks (torchrun, gloo) computes exactly what one process computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from albef_ds.config import load_config
from albef_ds.data.synth import generate_synthetic
from tests.helpers import ROOT, torchrun


def _overrides(synth: Path) -> list[str]:
    return [
        f"data.synth.out_dir={synth}",
        "data.synth.num_train=8",
        "data.synth.num_eval=27",  # 27 images, ~68 texts: shards of unequal size on 2 ranks
        "data.synth.image_size=32",
        f"data.eval_file={synth / 'eval.json'}",
        f"data.tokenizer={synth / 'vocab.txt'}",
        "data.num_workers=0",
        "model.vision.image_size=32",
        "train.tensorboard=false",
        "eval.batch_size=4",
        "eval.k_test=5",
        "eval.itm_batch_size=12",
    ]


def _run(cmd: list[str], out: Path) -> tuple[dict, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "m.json").read_text()), torch.load(out / "s.pt", weights_only=True)


def test_two_ranks_give_the_single_process_numbers(tmp_path):
    synth = tmp_path / "synth"
    ov = _overrides(synth)
    generate_synthetic(load_config(ROOT / "configs/debug.yaml", ov).data.synth, progress=False)
    args = ["evaluate", "retrieval", "--config", str(ROOT / "configs/debug.yaml"), *ov]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    m1, s1 = _run(
        [
            sys.executable,
            "-m",
            "albef_ds.cli",
            *args,
            "--output",
            str(one / "m.json"),
            "--save-scores",
            str(one / "s.pt"),
        ],
        one,
    )
    m2, s2 = _run(
        [
            *torchrun(2, "-m", "albef_ds.cli"),
            *args,
            "--output",
            str(two / "m.json"),
            "--save-scores",
            str(two / "s.pt"),
        ],
        two,
    )
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    assert m1["num_images"] == 27 and m1["num_texts"] > 27
    for k in m1:
        if k != "world_size":
            assert m1[k] == m2[k], k
    for k in ("itc", "i2t", "t2i"):
        assert torch.equal(s1[k], s2[k]), k
