"""Hostile and broken checkpoints (issue 17, classes 1 and 2) on real torch-engine checkpoints: every damage
to the newest one is found and named, the newest complete verified one is resumed instead (or a clear error
stops the run), and no pickle from a checkpoint ever runs code. The DeepSpeed side (its own readers, the
universal conversion, 2 real ranks) is tests/train/test_checkpoint_integrity_ds.py."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from albef_ds.config import ConfigError, load_config
from albef_ds.model import ALBEFPretrain
from albef_ds.train.checkpoint import step_tag
from albef_ds.train.checkpoint.manager import CheckpointManager
from albef_ds.train.engine import TorchEngine
from tests.helpers import SPECIAL, tiny_model_config
from tests.train.checkpoint.damage import flip_tensor_bytes, forge_manifest, plant_payload, truncate

OLD, NEW = step_tag(4), step_tag(8)


def _engine() -> TorchEngine:
    cfg = load_config(None, [])
    cfg.model = tiny_model_config()
    return TorchEngine(ALBEFPretrain(cfg.model, special_tokens=SPECIAL), cfg, torch.device("cpu"))


@pytest.fixture
def root(tmp_path):
    """checkpoints/ with two real torch-engine checkpoints saved through the manager (latest = step 8)."""
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, rank=0, world_size=1, keep_last=3)
    engine = _engine()
    for step in (4, 8):
        with torch.no_grad():
            next(engine.module.parameters()).add_(1.0)  # the two checkpoints hold different weights
        mgr.save(engine, step, {"step": step, "epoch": 0, "batches_in_epoch": step, "world_size": 1})
    return root


def _mgr(root) -> CheckpointManager:
    return CheckpointManager(root, rank=0, world_size=1, keep_last=3)


def test_save_writes_a_manifest_of_every_file(root):
    body = json.loads((root / NEW / "manifest.json").read_text())
    assert sorted(body["files"]) == ["albef_ds.json", "rng_rank0.pt", "state.pt"]
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in body["files"].values())
    assert _mgr(root).resolve("auto") == NEW


def _corrupt_rng(root):
    (root / NEW / "rng_rank0.pt").write_bytes(b"\x00garbage" * 100)


FILE_DAMAGE = {
    "truncated state.pt": (lambda r: truncate(r / NEW / "state.pt"), "state.pt"),
    "flipped bytes in a tensor": (lambda r: flip_tensor_bytes(r / NEW / "state.pt"), "state.pt"),
    "corrupt rng file": (_corrupt_rng, "rng_rank0.pt"),
    "truncated client file": (lambda r: truncate(r / NEW / "albef_ds.json"), "albef_ds.json"),
    "missing rank file": (lambda r: (r / NEW / "rng_rank0.pt").unlink(), "rng_rank0.pt"),
    "damaged manifest": (lambda r: (r / NEW / "manifest.json").write_text("{"), "manifest.json"),
}


@pytest.mark.parametrize("how", FILE_DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(root, how, caplog):
    damage, name = FILE_DAMAGE[how]
    damage(root)
    mgr = _mgr(root)
    with caplog.at_level(logging.WARNING):
        assert mgr.resolve("auto") == OLD
    assert str(root / NEW / name) in caplog.text
    assert "RESUMING FROM AN OLDER CHECKPOINT" in caplog.text
    # The damaged one is kept aside for inspection, out of the way of this run's saves and pruning.
    assert not (root / NEW).exists() and (root / "rejected" / NEW).is_dir()
    engine = _engine()
    client, rng = mgr.load(engine, OLD)
    assert client["step"] == 4 and rng is not None


LATEST_DAMAGE = {
    "empty": b"",
    "garbage": b"\x89PNG not a tag at all",
    "names a missing folder": b"step_00000012\n",
    "not UTF-8": b"\xff\xfe\xfa",
}


@pytest.mark.parametrize("how", LATEST_DAMAGE)
def test_broken_latest_is_never_read_as_no_checkpoint(root, how, caplog):
    (root / "latest").write_bytes(LATEST_DAMAGE[how])
    with caplog.at_level(logging.WARNING):
        assert _mgr(root).resolve("auto") == NEW  # the newest complete, verified one
    assert str(root / "latest") in caplog.text and "RESUMING FROM AN OLDER CHECKPOINT" in caplog.text


def test_no_usable_checkpoint_is_a_clear_error_and_nothing_is_deleted(root):
    (root / "latest").write_text("garbage\n")
    truncate(root / NEW / "state.pt")
    (root / OLD / "rng_rank0.pt").unlink()
    with pytest.raises(ValueError, match="cannot resume") as e:
        _mgr(root).resolve("auto")
    assert str(root / NEW / "state.pt") in str(e.value) and str(root / OLD / "rng_rank0.pt") in str(e.value)
    assert (root / NEW).is_dir() and (root / OLD).is_dir()
    # An explicitly named damaged checkpoint is an error too (no fallback from what the user asked for).
    with pytest.raises(ValueError, match="state.pt"):
        _mgr(root).resolve(NEW)
    with pytest.raises(ConfigError, match="no checkpoint folder"):
        _mgr(root).resolve("step_00000099")


@pytest.mark.parametrize("name", ["state.pt", "rng_rank0.pt"])
def test_a_pickle_payload_never_runs(root, tmp_path, name):
    """The payload is live (a plain torch.load would run it); with the manifest forged to match, only the
    weights_only unpickling is left to refuse it: at resolve, at an explicit resume, and in the engine's and
    the manager's own loads."""
    canary = tmp_path / "canary"
    plant_payload(root / NEW / name, canary)
    forge_manifest(root / NEW)
    shutil.copytree(root / NEW, tmp_path / "probe")
    torch.load(tmp_path / "probe" / name, weights_only=False)
    assert canary.exists(), "the payload is not live: the test would prove nothing"
    canary.unlink()

    with pytest.raises(ValueError, match=str(root / NEW / name)):
        _mgr(root).resolve(NEW)
    engine = _engine()
    with pytest.raises(ValueError, match=name):
        _mgr(root).load(engine, NEW)
    assert _mgr(root).resolve("auto") == OLD
    assert not canary.exists()


def test_checkpoint_without_manifest_is_accepted_with_a_warning_but_never_as_fallback(root, caplog):
    (root / NEW / "manifest.json").unlink()  # as written before manifests existed
    with caplog.at_level(logging.WARNING):
        assert _mgr(root).resolve("auto") == NEW
    assert "has no manifest.json" in caplog.text
    (root / OLD / "manifest.json").unlink()
    (root / "latest").write_text("")
    with pytest.raises(ValueError, match="no manifest.json"):
        _mgr(root).resolve("auto")


def test_an_interrupted_save_is_cleared_and_a_first_one_means_a_fresh_start(root, tmp_path):
    partial = root / step_tag(12)
    shutil.copytree(root / NEW, partial)
    (partial / "manifest.json").unlink()  # killed before every rank had finished
    assert _mgr(root).resolve("auto") == NEW
    assert not partial.exists()
    # Killed during the very first save: no `latest`, no manifest -> a fresh start, the debris removed.
    first = tmp_path / "first"
    shutil.copytree(root / OLD, first / OLD)
    (first / OLD / "manifest.json").unlink()
    assert _mgr(first).resolve("auto") is None
    assert not (first / OLD).exists() and (first / "rejected" / OLD).is_dir()


def test_a_file_that_verifies_but_does_not_load_is_named(root):
    payload = torch.load(root / NEW / "state.pt", weights_only=True)
    del payload["optimizer"]
    torch.save(payload, root / NEW / "state.pt")
    forge_manifest(root / NEW)
    with pytest.raises(ValueError, match=f"{root / NEW / 'state.pt'}.*KeyError"):
        _mgr(root).load(_engine(), NEW)


def test_load_weights_and_export_check_the_manifest_too(root, tmp_path):
    from albef_ds.train.checkpoint import export_weights, load_weights

    flip_tensor_bytes(root / NEW / "state.pt")
    model = ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL)
    with pytest.raises(ValueError, match=f"{root / NEW / 'state.pt'}: sha256"):
        load_weights(model, root / NEW)
    with pytest.raises(ValueError, match="sha256"):
        export_weights(root / NEW, tmp_path / "w.safetensors")
    load_weights(model, root / OLD)
