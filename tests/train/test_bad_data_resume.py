"""Pre-training on a list with 13% unusable files at batch_size=2: batches are refilled, the skips counted,
and a mid-epoch resume trains on exactly the batches of an uninterrupted run (issue 17, class 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from albef_ds.cli import main
from albef_ds.train.runtime import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")
STEPS = 24  # 26 good + 4 bad = 15 batches of 2 per epoch: the run crosses an epoch boundary


@pytest.fixture(scope="module")
def bad_list(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("bad_data_resume") / "set"
    ov = [f"data.synth.out_dir={d}", "data.synth.num_train=26", "data.synth.num_eval=4"]
    assert main(["data", "synth", "--config", CFG, *ov]) == 0
    entries = json.loads((d / "train.json").read_text())
    good = (d / entries[0]["image"]).read_bytes()
    for k, data in enumerate([good[: len(good) // 2], b"", b"not an image" * 9, good[: len(good) // 3]]):
        (d / f"bad{k}.jpg").write_bytes(data)
        entries.insert(3 + 7 * k, {"image": f"bad{k}.jpg", "caption": "a bad file"})
    (d / "with_bad.json").write_text(json.dumps(entries))
    return [
        f"data.train_file=[{d / 'with_bad.json'}]",
        f"data.tokenizer={d / 'vocab.txt'}",
        "data.eval_file=",
        "data.num_workers=0",
        "train.batch_size=2",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.eval_at_start=false",
        "train.eval_at_end=false",
        "train.record_samples=true",
        "model.queue_size=8",
    ]


def _run(ov: list[str], out: Path, *extra: str) -> int:
    return main(["pretrain", "--config", CFG, *ov, f"train.output_dir={out}", *extra])


def _skips(out: Path) -> dict[int, int]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["skipped_images"] for r in recs if r["event"] == "train"}


def test_refilled_batches_train_through_bad_files_and_resume_exactly(tmp_path, bad_list):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _run(bad_list, straight) == 0  # used to stop at the first batch with one bad file
    seen = json.loads((straight / "rank0.json").read_text())["samples"]
    assert len(seen) == 2 * STEPS  # every step trained on a full batch
    skips = _skips(straight)
    assert sorted(skips) == list(range(1, STEPS + 1)) and skips[STEPS] >= 4  # each bad file met at least once
    # Stop mid-epoch after a batch that skipped files, resume: the same samples, step for step.
    stop = 9
    assert skips[stop] > 0
    assert _run(bad_list, resumed, f"train.stop_at_step={stop}") == EXIT_PREEMPTED
    first = json.loads((resumed / "rank0.json").read_text())["samples"]
    assert _run(bad_list, resumed, "train.resume=auto") == 0
    rest = json.loads((resumed / "rank0.json").read_text())["samples"]
    assert first + rest == seen
    assert _skips(resumed)[STEPS] == skips[STEPS]
