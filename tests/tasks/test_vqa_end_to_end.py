"""`albef-ds finetune vqa` on the synthetic VQA set from the pre-trained debug model, on 2 real DeepSpeed
ranks: the local-split VQA accuracy rises well above the majority-answer baseline, the EvalAI file holds
every test question once, a 2-rank evaluation equals a 1-process one, and a SIGUSR1 mid-run resumes
exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from albef_ds.cli import main
from albef_ds.train.runtime import EXIT_PREEMPTED
from tests.helpers import launch_deepspeed, signal_ranks_at

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/vqa_debug.yaml")


def _synth(tmp: Path, name: str, train: int, val: int, test: int) -> list[str]:
    out = tmp / name
    ov = [
        f"vqa.synth.out_dir={out}",
        f"vqa.synth.num_train={train}",
        f"vqa.synth.num_val={val}",
        f"vqa.synth.num_test={test}",
        f"vqa.train_file=[{out / 'train.json'}]",
        f"vqa.val_file={out / 'val.json'}",
        f"vqa.test_file={out / 'test.json'}",
        f"vqa.answer_list={out / 'answer_list.json'}",
    ]
    assert main(["data", "synth-vqa", "--config", CFG, *ov]) == 0
    return ov


def _args(ov: list[str], run: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "vqa",
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


@pytest.fixture(scope="module")
def learned(pretrained, tmp_path_factory):
    """2 ranks x 16 questions, from the pre-trained debug model."""
    tmp = tmp_path_factory.mktemp("vqa")
    ov = [*pretrained.common, *_synth(tmp, "synth_vqa", 600, 100, 60), f"model.albef_init={pretrained.run}"]
    ov += ["train.batch_size=16", "train.epochs=3"]  # 1800 questions / 32 = 56 steps per epoch
    run = tmp / "run"
    out = launch_deepspeed(2, _args(ov, run))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return tmp, ov, run


@pytest.mark.slow
def test_two_rank_finetuning_beats_the_majority_answer(learned):
    tmp, _, run = learned
    res = json.loads((run / "results.json").read_text())
    assert res["task"] == "vqa" and res["world_size"] == 2 and res["steps"] == 168
    assert [v["step"] for v in res["history"]] == [56, 112, 168]
    base = res["baseline"]
    assert base["val_majority_accuracy"] < 20.0
    assert res["val"]["accuracy"] > base["val_majority_accuracy"] + 25.0, (res["val"], base)
    assert res["test"]["accuracy"] > base["test_majority_accuracy"] + 25.0
    best = max(res["history"], key=lambda v: v["accuracy"])
    assert res["best_step"] == best["step"] and res["best_val_accuracy"] == best["accuracy"]
    # The EvalAI file: every test question exactly once, answers from the answer list.
    test = json.loads((tmp / "synth_vqa" / "test.json").read_text())
    answers = json.loads((run / "vqa_test_answers.json").read_text())
    assert sorted(a["question_id"] for a in answers) == sorted(r["question_id"] for r in test)
    allowed = set(json.loads((tmp / "synth_vqa" / "answer_list.json").read_text()))
    assert {a["answer"] for a in answers} <= allowed


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_process(learned):
    tmp, ov, run = learned
    test = tmp / "synth_vqa" / "test.json"
    common = ["evaluate", "vqa", "--config", CFG, *ov, "--checkpoint", str(run / "checkpoint_best.pt")]
    one, two = tmp / "one", tmp / "two"
    assert main([*common, "--output", str(one / "m.json"), "--answers-file", str(one / "a.json")]) == 0
    out = launch_deepspeed(
        2, [*common, "--output", str(two / "m.json"), "--answers-file", str(two / "a.json")]
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    m1, m2 = (json.loads((d / "m.json").read_text()) for d in (one, two))
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m1["accuracy"] == m2["accuracy"] and m1["questions"] == m2["questions"] == 180
    a1, a2 = (json.loads((d / "a.json").read_text()) for d in (one, two))
    assert a1 == a2 and len({a["question_id"] for a in a2}) == len(a2) == 180
    # ... and the fine-tuning run's own test numbers (2 ranks, best weights in memory) agree.
    res = json.loads((run / "results.json").read_text())
    assert res["test"]["accuracy"] == pytest.approx(m1["accuracy"], abs=1e-9)
    assert json.loads(test.read_text())[0]["question_id"] == a1[0]["question_id"]


@pytest.mark.slow
def test_sigusr1_mid_run_resumes_exactly(pretrained, tmp_path):
    ov = [*pretrained.common, *_synth(tmp_path, "small", 64, 12, 8), f"model.albef_init={pretrained.run}"]
    ov += ["train.batch_size=16", "train.epochs=2", "train.log_every=1"]  # 192 questions: 6 steps per epoch
    straight, run = tmp_path / "straight", tmp_path / "signalled"
    out = launch_deepspeed(2, _args(ov, straight), threads=1)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rc, log = signal_ranks_at(2, _args(ov, run, "train.save_every=100"), "step 3/12")
    assert rc == EXIT_PREEMPTED, log[-4000:]
    assert "received SIGUSR1" in log and not (run / "results.json").exists()
    stopped = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 < stopped < 12, stopped
    out = launch_deepspeed(2, [*_args(ov, run), "train.resume=auto"], threads=1)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    a, b = _train(straight), _train(run)
    assert sorted(b) == list(range(1, 13))
    for step in range(stopped + 1, 13):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (straight, run))
    assert [v["step"] for v in rb["history"]] == [6, 12]
    for va, vb in zip(ra["history"], rb["history"]):
        assert vb["accuracy"] == va["accuracy"]
    assert (rb["best_epoch"], rb["test"]["accuracy"]) == (ra["best_epoch"], ra["test"]["accuracy"])
    assert (run / "vqa_test_answers.json").read_text() == (straight / "vqa_test_answers.json").read_text()


def test_dali_loader_and_evaluation_from_a_pretraining_checkpoint(pretrained, tmp_path, capsys):
    """The task through DALI's CPU pipeline (4 steps, one process), and `evaluate vqa` of a pre-training
    checkpoint (the decoder derived from its fusion layers) writing the EvalAI file; a checkpoint without
    the decoder's source layers is refused."""
    pytest.importorskip("nvidia.dali")
    ov = [*pretrained.common, *_synth(tmp_path, "tiny", 24, 6, 4), f"model.albef_init={pretrained.run}"]
    run = tmp_path / "run"
    args = ["finetune", "vqa", "--config", CFG, *ov, f"train.output_dir={run}", "data.loader=dali"]
    assert main([*args, "train.batch_size=8", "train.max_steps=4", "train.log_every=2"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 4 and res["val"]["questions"] == 18 and res["test"]["questions"] == 12
    answers = tmp_path / "answers.json"
    common = ["evaluate", "vqa", "--config", CFG, *ov, "--answers-file", str(answers)]
    assert main([*common, "--checkpoint", str(pretrained.run), "--output", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["questions"] == 12 and m["split"].endswith("test.json") and 0.0 <= m["accuracy"] <= 100.0
    assert len(json.loads(answers.read_text())) == 12
    # A checkpoint whose fusion layers are gone cannot give the decoder its weights: an error naming them.
    import torch

    from albef_ds.train.checkpoint.manager import save_consolidated

    sd = torch.load(pretrained.run / "checkpoint.pt", weights_only=True)["model"]
    sd = {k: v for k, v in sd.items() if ".layer.3." not in k}
    save_consolidated(tmp_path / "partial.pt", sd, {})
    assert main([*common, "--checkpoint", str(tmp_path / "partial.pt")]) == 2
    err = capsys.readouterr().err
    assert "answer-decoder tensor(s) missing" in err and "text_decoder.bert.encoder.layer.1." in err
