"""SNLI-VE, NLVR2 text assignment and NLVR2 on 2 real DeepSpeed ranks from the pre-trained debug model, on
the synthetic sets: VE accuracy well above the majority class, the TA -> NLVR2 chain, 2-rank evaluation
equal to 1-process evaluation, and the NLVR2 teacher equal to the loaded student at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from albef_ds.cli import main
from tests.helpers import launch_deepspeed

ROOT = Path(__file__).resolve().parents[2]
VE_CFG, TA_CFG, NLVR_CFG = (
    str(ROOT / f"configs/{n}.yaml") for n in ("ve_debug", "nlvr2_ta_debug", "nlvr2_debug")
)


def _synth(section: str, command: str, cfg: str, out: Path, train: int, val: int, test: int) -> list[str]:
    ov = [
        f"{section}.synth.out_dir={out}",
        f"{section}.synth.num_train={train}",
        f"{section}.synth.num_val={val}",
        f"{section}.synth.num_test={test}",
        f"{section}.train_file=[{out / 'train.json'}]",
        f"{section}.val_file={out / 'val.json'}",
        f"{section}.test_file={out / 'test.json'}",
    ]
    assert main(["data", command, "--config", cfg, *ov]) == 0
    return ov


def _launch(task: str, cfg: str, ov: list[str], run: Path) -> dict:
    args = ["finetune", task, "--config", cfg, *ov, "train.engine=deepspeed", f"train.output_dir={run}"]
    out = launch_deepspeed(2, args)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return json.loads((run / "results.json").read_text())


def _same_evaluation(task: str, cfg: str, ov: list[str], run: Path, tmp: Path) -> None:
    common = ["evaluate", task, "--config", cfg, *ov, "--checkpoint", str(run / "checkpoint_best.pt")]
    assert main([*common, "--output", str(tmp / f"{task}_one.json")]) == 0
    out = launch_deepspeed(2, [*common, "--output", str(tmp / f"{task}_two.json")])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    one, two = (json.loads((tmp / f"{task}_{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["accuracy"] == two["accuracy"] and one["examples"] == two["examples"]
    res = json.loads((run / "results.json").read_text())
    assert res["test"]["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)
    assert res["test"]["examples"] == one["examples"]


@pytest.mark.slow
def test_ve_two_ranks_beats_the_majority_class(pretrained, tmp_path):
    ov = [*pretrained.common, f"model.albef_init={pretrained.run}", "train.batch_size=16", "train.epochs=2"]
    ov += _synth("ve", "synth-ve", VE_CFG, tmp_path / "ve", 1200, 150, 150)  # 37 steps per epoch
    res = _launch("ve", VE_CFG, ov, tmp_path / "run")
    base = res["baseline"]
    assert res["world_size"] == 2 and [v["step"] for v in res["history"]] == [37, 74]
    assert res["val"]["accuracy"] > base["val_majority_accuracy"] + 20.0, (res["val"], base)
    assert res["test"]["accuracy"] > base["test_majority_accuracy"] + 20.0
    _same_evaluation("ve", VE_CFG, ov, tmp_path / "run", tmp_path)


@pytest.mark.slow
def test_text_assignment_then_nlvr2_on_two_ranks(pretrained, tmp_path):
    """The TA -> NLVR2 chain on 2 ranks: TA trains and writes the checkpoint NLVR2 loads (paired, no momentum
    weights), NLVR2 fine-tunes, validates and tests from it, and its 2-rank evaluation equals a 1-process
    one. Accuracy is not asserted: 6 steps are far too few to learn (the shipped recipe's 2-rank run, 465
    steps, reaches val 78.3% against a 50% majority: benchmarks/README.md)."""
    ta_set = tmp_path / "ta_set"
    ta_gen = [f"nlvr.ta_synth.out_dir={ta_set}", "nlvr.ta_synth.num_train=600", "nlvr.ta_synth.image_size=48"]
    assert main(["data", "synth-ta", "--config", TA_CFG, *ta_gen]) == 0
    ta_ov = [
        *pretrained.common,
        f"model.albef_init={pretrained.run}",
        f"data.train_file=[{ta_set / 'train.json'}]",
        "train.batch_size=16",  # 1 epoch of 600 scenes on 2 ranks: 18 steps
    ]
    ta = _launch("nlvr2-ta", TA_CFG, ta_ov, tmp_path / "ta")
    assert ta["task"] == "nlvr2-ta" and ta["steps"] == 18 and ta["world_size"] == 2
    records = [json.loads(x) for x in (tmp_path / "ta" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [18]
    assert ta["train"]["step"] == 18 and 0.0 <= ta["train"]["train_acc"] <= 1.0
    assert ta["baseline"] == {"chance_train_acc": pytest.approx(1.0 / 3.0)}
    sd = torch.load(tmp_path / "ta" / "checkpoint.pt", weights_only=True)["model"]
    assert "text_encoder.bert.encoder.layer.5.crossattention.self.key.weight" in sd and "ta_head.weight" in sd

    ov = [*pretrained.common, f"model.albef_init={tmp_path / 'ta'}", "train.batch_size=16", "train.epochs=2"]
    ov += _synth("nlvr", "synth-nlvr2", NLVR_CFG, tmp_path / "nlvr", 96, 30, 30)  # 3 steps per epoch
    res = _launch("nlvr2", NLVR_CFG, ov, tmp_path / "run")
    assert res["world_size"] == 2 and [v["step"] for v in res["history"]] == [3, 6]
    assert res["test"]["examples"] == 30 and {"majority_class", "val_majority_accuracy"} <= set(
        res["baseline"]
    )
    _same_evaluation("nlvr2", NLVR_CFG, ov, tmp_path / "run", tmp_path)


def test_nlvr2_teacher_starts_as_the_loaded_student(pretrained, tmp_path):
    """A TA-style checkpoint (no momentum weights) into NLVR2: right after start-up every momentum tensor
    equals its online tensor, and the online paired blocks hold the checkpoint's fusion layers."""
    from albef_ds.config import load_config
    from albef_ds.tasks import make_task
    from albef_ds.train.dist_env import DistInfo
    from albef_ds.train.task import TaskContext

    cfg = load_config(NLVR_CFG, [*pretrained.common, f"model.albef_init={pretrained.run / 'checkpoint.pt'}"])
    info = DistInfo(0, 0, 1, 1, 0, "127.0.0.1", 0, "single")
    ctx = TaskContext(cfg, info, torch.device("cpu"), tmp_path, None, {})
    model = make_task("nlvr2", cfg).build_model(ctx)
    moms, onlines = model.momentum_pairs()
    assert len(moms) == len(onlines) > 0
    for m, p in zip(moms, onlines):
        assert torch.equal(m, p.detach())
    sd = torch.load(pretrained.run / "checkpoint.pt", weights_only=True)["model"]
    key = "text_encoder.bert.encoder.layer.3.attention.self.query.weight"
    for block in (4, 5):  # fusion layer 3 -> blocks 4 and 5
        got = model.state_dict()[f"text_encoder.bert.encoder.layer.{block}.attention.self.query.weight"]
        assert torch.equal(got, sd[key])
