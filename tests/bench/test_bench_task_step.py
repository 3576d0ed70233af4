"""benchmarks/bench_task_step.py: the task's own trainer step on synthetic batches of its batch dict (NLVR2's
two images, VE's one), timed, with a finite loss; bad step counts refused."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from albef_ds.config import load_config
from tests.helpers import ROOT

_spec = importlib.util.spec_from_file_location("bench_task_step", ROOT / "benchmarks/bench_task_step.py")
bts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bts)


@pytest.mark.parametrize("task,config", [("nlvr2", "nlvr2_debug"), ("ve", "ve_debug")])
def test_task_step_benchmark(task, config, tmp_path):
    cfg = load_config(ROOT / f"configs/{config}.yaml", ["train.batch_size=3", "train.engine=torch"])
    batches = bts.synthetic_batches(task, cfg, 3, torch.device("cpu"), torch.float32)
    keys = {"image0", "image1"} if task == "nlvr2" else {"image"}
    assert set(batches[0]) == keys | {"input_ids", "attention_mask", "label"}
    assert batches[0]["label"].max() < (2 if task == "nlvr2" else 3)
    out = tmp_path / "step.json"
    assert (
        bts.main(
            [
                "--task",
                task,
                "--config",
                str(ROOT / f"configs/{config}.yaml"),
                "--warmup",
                "1",
                "--steps",
                "2",
                "--out",
                str(out),
                "train.batch_size=3",
                "train.engine=torch",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert (res["task"], res["batch_per_device"], res["steps"], res["engine"]) == (task, 3, 2, "torch")
    assert res["samples_per_s"] == pytest.approx(3 / res["step_time_s"])
    assert res["params"] > 0 and torch.isfinite(torch.tensor(res["mean_loss"]))
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        bts.bench_task_step(task, cfg, warmup=0, steps=0)
