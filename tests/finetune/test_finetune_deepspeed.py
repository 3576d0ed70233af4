"""Retrieval fine-tuning on 2 real DeepSpeed ZeRO-2 ranks (CPU accelerator, gloo), and `evaluate retrieval`
straight from one of its DeepSpeed checkpoint folders (ZeRO partitions, no export step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from albef_ds.cli import main
from tests.helpers import launch_deepspeed, small_karpathy_set

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/finetune_debug.yaml")
METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "itc_r_mean")


@pytest.fixture(scope="module")
def ds_finetune(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft_ds")
    # 288 captions / (2 ranks x batch 24) = 6 steps per epoch
    ov = small_karpathy_set(tmp) + ["train.epochs=2", "train.max_steps=12", "train.log_every=3"]
    run = tmp / "run"
    out = launch_deepspeed(
        2,
        [
            "finetune",
            "retrieval",
            "--config",
            CFG,
            *ov,
            "train.engine=deepspeed",
            f"train.output_dir={run}",
            "train.save_every=6",
        ],
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return tmp, ov, run


def _evaluate(ov, tmp: Path, checkpoint: Path, name: str) -> dict:
    out = tmp / f"{name}.json"
    args = ["evaluate", "retrieval", "--config", CFG, *ov, "--split-file", str(tmp / "kp" / "test.json")]
    assert main([*args, "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_two_rank_finetuning_runs_and_reports(ds_finetune):
    tmp, ov, run = ds_finetune
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == 12
    assert [v["step"] for v in res["val"]] == [6, 12]
    best = max(res["val"], key=lambda v: v["r_mean"])
    assert res["best_step"] == best["step"]
    # The 2-rank test evaluation of the best weights = a single-process evaluation of checkpoint_best.pt.
    again = _evaluate(ov, tmp, run / "checkpoint_best.pt", "best")
    for k in METRICS:
        assert again[k] == pytest.approx(res["test"][k], abs=1e-6), k
    # A resumable DeepSpeed checkpoint was written mid-run, with the fine-tuning state in its client file.
    client = json.loads((run / "checkpoints" / "step_00000006" / "albef_ds.json").read_text())
    assert client["step"] == 6 and client["world_size"] == 2 and client["finetune"]["val"][0]["step"] == 6


def test_evaluate_straight_from_a_deepspeed_folder(ds_finetune, tmp_path):
    tmp, ov, run = ds_finetune
    folder = run / "checkpoints" / "step_00000006"
    assert any(p.name.endswith("optim_states.pt") for p in folder.iterdir())  # ZeRO partitions, one per rank
    from_folder = _evaluate(ov, tmp, folder, "from_folder")
    exported = tmp_path / "w.safetensors"
    assert main(["export", str(folder), "-o", str(exported)]) == 0
    from_file = _evaluate(ov, tmp, exported, "from_file")
    for k in METRICS:
        assert from_folder[k] == from_file[k], k
