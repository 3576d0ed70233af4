"""Retrieval fine-tuning on 2 real DeepSpeed ZeRO-2 ranks (CPU accelerator, gloo): the run and its results, a
real SIGUSR1 mid-run (checkpoint, exit 85) resumed exactly, the same checkpoint resumed on 1 rank (universal
path), and `evaluate retrieval` straight from a DeepSpeed checkpoint folder (ZeRO partitions, no export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from albef_ds.cli import main
from albef_ds.train.runtime import EXIT_PREEMPTED
from tests.helpers import launch_deepspeed, signal_ranks_at, small_karpathy_set

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/finetune_debug.yaml")
METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "itc_r_mean")


@pytest.fixture(scope="module")
def ds_finetune(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft_ds")
    # 288 captions / (2 ranks x batch 24) = 6 steps per epoch
    ov = small_karpathy_set(tmp) + ["train.epochs=2", "train.max_steps=12", "train.log_every=1"]
    run = tmp / "run"
    # One thread per rank: deterministic reductions, so the resumed run below can match to 1e-6.
    out = launch_deepspeed(2, [*_args(ov, run), "train.save_every=6"], threads=1)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return tmp, ov, run


def _args(ov: list[str], run: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "retrieval",
        "--config",
        CFG,
        *ov,
        "train.engine=deepspeed",
        f"train.output_dir={run}",
        *extra,
    ]


def _train(run: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["event"] == "train"}


def test_sigusr1_on_two_ranks_checkpoints_and_resumes_exactly(ds_finetune, tmp_path):
    tmp, ov, straight = ds_finetune
    run = tmp_path / "signalled"
    rc, log = signal_ranks_at(2, _args(ov, run), "step 3/12")
    assert rc == EXIT_PREEMPTED, log[-4000:]
    assert "received SIGUSR1" in log and not (run / "results.json").exists()
    tag = (run / "checkpoints" / "latest").read_text().strip()
    stopped = int(tag.split("_")[1])
    assert 3 < stopped < 12, stopped  # every rank stopped after the same step, a few steps after the signal
    # The same checkpoint, copied aside before the resume, for the 1-rank run below.
    one = tmp_path / "one"
    shutil.copytree(run, one, ignore=shutil.ignore_patterns("universal"))

    out = launch_deepspeed(2, [*_args(ov, run), "train.resume=auto"], threads=1)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    a, b = _train(straight), _train(run)
    assert sorted(b) == list(range(1, 13))
    for step in range(stopped + 1, 13):
        for k in ("loss", "loss_itc", "loss_itm"):
            assert b[step][k] == pytest.approx(a[step][k], abs=1e-6), (step, k)
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (straight, run))
    assert rb["resumed_from"] == tag and [v["step"] for v in rb["history"]] == [6, 12]
    assert (rb["best_epoch"], rb["best_step"]) == (ra["best_epoch"], ra["best_step"])
    for k in METRICS:
        assert rb["test"][k] == pytest.approx(ra["test"][k], abs=1e-6), k

    # The 2-rank fine-tune checkpoint on 1 rank: DeepSpeed's universal checkpoint, to the end.
    out = launch_deepspeed(1, [*_args(ov, one), "train.resume=auto"], threads=1)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert "resuming a 2-rank checkpoint on 1 ranks" in log and "loaded the universal checkpoint" in log
    r1 = json.loads((one / "results.json").read_text())
    assert r1["world_size"] == 1 and r1["resumed_from"] == tag and r1["steps"] == 12
    assert set(METRICS) <= set(r1["test"])


def _evaluate(ov, tmp: Path, checkpoint: Path, name: str) -> dict:
    out = tmp / f"{name}.json"
    args = ["evaluate", "retrieval", "--config", CFG, *ov, "--split-file", str(tmp / "kp" / "test.json")]
    assert main([*args, "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_two_rank_finetuning_runs_and_reports(ds_finetune):
    tmp, ov, run = ds_finetune
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == 12
    assert [v["step"] for v in res["history"]] == [6, 12]
    best = max(res["history"], key=lambda v: v["r_mean"])
    assert res["best_step"] == best["step"]
    # The 2-rank test evaluation of the best weights = a single-process evaluation of checkpoint_best.pt.
    again = _evaluate(ov, tmp, run / "checkpoint_best.pt", "best")
    for k in METRICS:
        assert again[k] == pytest.approx(res["test"][k], abs=1e-6), k
    # A resumable DeepSpeed checkpoint was written mid-run, with the fine-tuning state in its client file.
    client = json.loads((run / "checkpoints" / "step_00000006" / "albef_ds.json").read_text())
    assert client["step"] == 6 and client["world_size"] == 2 and client["eval"]["history"][0]["step"] == 6


def test_evaluate_from_a_deepspeed_folder_a_run_folder_and_an_exported_file(ds_finetune, tmp_path):
    """`evaluate retrieval --checkpoint` gives the same numbers for a DeepSpeed checkpoint folder (ZeRO
    partitions, no export step), the run folder (its newest complete checkpoint) and the exported file."""
    tmp, ov, run = ds_finetune
    tag = (run / "checkpoints" / "latest").read_text().strip()
    folder = run / "checkpoints" / tag
    assert any(p.name.endswith("optim_states.pt") for p in folder.iterdir())  # ZeRO partitions, one per rank
    from_folder = _evaluate(ov, tmp, folder, "from_folder")
    from_run = _evaluate(ov, tmp, run, "from_run")
    exported = tmp_path / "w.safetensors"
    assert main(["export", str(folder), "-o", str(exported)]) == 0
    from_file = _evaluate(ov, tmp, exported, "from_file")
    for k in METRICS:
        assert from_folder[k] == from_file[k] == from_run[k], k
