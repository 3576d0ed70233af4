"""Grounding on 2 real DeepSpeed ranks from the demo's pre-trained debug model (`demo_pretrained`), on the
synthetic referring expressions: accuracy well above the random-proposal and the largest-box baselines
(results.json), pictures in the run folder, 2-rank evaluation equal to 1-process evaluation, and
`visualize grounding`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef_ds.cli import main
from tests.helpers import launch_deepspeed

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/grounding_debug.yaml")


@pytest.mark.slow
def test_grounding_two_ranks_beats_the_proposal_baselines(demo_pretrained, tmp_path):
    pretrained = demo_pretrained
    data = tmp_path / "synth_grounding"
    ov = [
        *pretrained.common,
        f"model.albef_init={pretrained.run}",
        f"grounding.synth.out_dir={data}",
        "grounding.synth.num_train_images=300",  # about 1,100 expressions: about 34 steps of 2 x 16
        "grounding.synth.num_val_images=40",
        "grounding.synth.num_test_images=60",
        f"grounding.train_file=[{data / 'train.json'}]",
        f"grounding.val_file={data / 'val.json'}",
        f"grounding.test_file={data / 'test.json'}",
        f"grounding.refs_file={data / 'refs.json'}",
        f"grounding.proposals_file={data / 'proposals.json'}",
        "grounding.num_pictures=4",
        "train.batch_size=16",
        "train.epochs=1",
        "train.eval_at_start=false",
    ]
    assert main(["data", "synth-grounding", "--config", CFG, *ov]) == 0
    run = tmp_path / "run"
    args = [
        "finetune",
        "grounding",
        "--config",
        CFG,
        *ov,
        "train.engine=deepspeed",
        f"train.output_dir={run}",
    ]
    out = launch_deepspeed(2, args)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    res = json.loads((run / "results.json").read_text())
    base = res["baseline"]
    expressions = len(json.loads((data / "train.json").read_text()))
    assert res["task"] == "grounding" and res["world_size"] == 2 and res["steps"] == expressions // 32
    assert set(res["test"]) >= {"accuracy_testA", "accuracy_testB", "expressions_testA"}
    for split in ("val", "test"):
        acc = res[split]["accuracy"]
        assert acc > base[f"{split}_random_proposal_accuracy"] + 5.0, (split, res[split], base)
        assert acc > base[f"{split}_largest_box_accuracy"] + 20.0, (split, res[split], base)
    grid = Path(res["test"]["pictures"])
    assert grid.is_file() and len(list(grid.parent.glob("0*.png"))) == 4

    # 2-rank evaluation = 1-process evaluation = the run's test result
    ckpt = ["--checkpoint", str(run / "checkpoint_best.pt")]
    common = ["evaluate", "grounding", "--config", CFG, *ov, f"train.output_dir={tmp_path / 'ev'}", *ckpt]
    assert main([*common, "--output", str(tmp_path / "one.json")]) == 0
    out = launch_deepspeed(2, [*common, "--output", str(tmp_path / "two.json")])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("accuracy", "accuracy_testA", "accuracy_testB", "expressions"):
        assert one[key] == two[key] == pytest.approx(res["test"][key], abs=1e-9), key

    # the pictures people look at
    pics = tmp_path / "pics"
    viz = ["visualize", "grounding", "--config", CFG, *ov, *ckpt, "--num", "6", "--out", str(pics)]
    assert main(viz) == 0
    assert len(list(pics.glob("0*.png"))) == 6
    with Image.open(pics / "grid.png") as im:
        px = np.asarray(im.convert("RGB"))
    assert px.shape[1] == 4 * 320 and px.shape[0] > 2 * 320
    assert px.std() > 20  # image, heat map and boxes: not a blank sheet
    magenta = (px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] > 200)  # the chosen proposal's colour
    assert magenta.sum() > 500
