"""Pre-training the debug model with data.loader=dali (CPU pipeline) learns like the torch loader, and both
skip the same bad images (counted in metrics.jsonl, hence TensorBoard's data/skipped_images)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef_ds.cli import main
from albef_ds.config import Config
from albef_ds.data import ShardedEpochSampler
from albef_ds.data.sampler import refill_batches

pytest.importorskip("nvidia.dali")

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")
STEPS, WINDOW, BATCH = 90, 15, 24
GOOD, BAD = 512, 16  # 528 = 22 batches of 24: every epoch uses every sample


def _crc_broken_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[png.index(b"IDAT") + 60] ^= 0xFF  # passes the header checks; check_image's PIL decode refuses it
    return bytes(png)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth_dali") / "set"
    ov = [f"data.synth.out_dir={d}", f"data.synth.num_train={GOOD}", "data.synth.num_eval=10"]
    assert main(["data", "synth", "--config", CFG, *ov]) == 0
    entries = json.loads((d / "train.json").read_text())
    good = (d / entries[0]["image"]).read_bytes()
    kinds = [("trunc.jpg", good[: len(good) // 2]), ("zero.jpg", b""), ("text.jpg", b"no image" * 9)]
    kinds.append(("crc.png", _crc_broken_png()))
    for k in range(BAD):
        name, data = kinds[k % len(kinds)]
        (d / f"bad{k}_{name}").write_bytes(data)
        entries.append({"image": f"bad{k}_{name}", "caption": "a bad file"})
    (d / "with_bad.json").write_text(json.dumps(entries))
    return [
        f"data.train_file=[{d / 'with_bad.json'}]",
        f"data.tokenizer={d / 'vocab.txt'}",
        "data.eval_file=",
        f"train.batch_size={BATCH}",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.eval_at_start=false",
        "train.eval_at_end=false",
        "train.save_every=0",
        "optim.warmup_steps=10",
        "loss.alpha_ramp_steps=30",
    ]


def _train_records(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in recs if r["event"] == "train"), key=lambda r: r["step"])


def _expected_skips() -> int:
    """Bad samples the first STEPS refilled batches of the seeded epoch orders read."""
    sampler = ShardedEpochSampler(GOOD + BAD, batch_size=BATCH, seed=Config().train.seed)  # the run's seed
    skips, steps, epoch = 0, 0, 0
    while steps < STEPS:
        sampler.set_epoch(epoch)
        stream = ((i, None if i >= GOOD else i) for i in sampler.stream())
        n = min(sampler.batches_per_epoch, STEPS - steps)
        skips += sum(s for _, s in refill_batches(stream, BATCH, n, limit=GOOD + BAD))
        steps, epoch = steps + n, epoch + 1
    return skips


def test_dali_loader_trains_like_the_torch_loader(tmp_path, synth):
    curves, skips = {}, {}
    for loader in ("torch", "dali"):
        run = tmp_path / loader
        argv = ["pretrain", "--config", CFG, *synth, f"data.loader={loader}", f"train.output_dir={run}"]
        assert main(argv) == 0
        recs = _train_records(run)
        assert len(recs) == STEPS
        curves[loader] = [r["loss"] for r in recs]
        skips[loader] = [r["skipped_images"] for r in recs]
    # The seed, the sampler and the bad files fix how many bad samples the run meets: both loaders skip
    # exactly those, step by step, and the run goes on.
    assert skips["torch"] == skips["dali"]
    assert skips["dali"][-1] == _expected_skips() > 60
    first = {k: sum(v[:WINDOW]) / WINDOW for k, v in curves.items()}
    last = {k: sum(v[-WINDOW:]) / WINDOW for k, v in curves.items()}
    print({k: (round(first[k], 3), round(last[k], 3)) for k in curves})
    for k in curves:
        assert last[k] < first[k] - 0.5, (k, first[k], last[k])  # it learns
    # Same model, same data order, same augmentation family: the curves agree.
    assert abs(first["dali"] - first["torch"]) < 0.1 * first["torch"]
    assert abs(last["dali"] - last["torch"]) < 0.1 * last["torch"]
