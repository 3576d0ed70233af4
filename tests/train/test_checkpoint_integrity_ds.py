"""Hostile and broken DeepSpeed checkpoints (issue 17, classes 1 and 2), on one real 2-rank ZeRO-2 run that
wrote two checkpoints: a `__reduce__` payload planted in each file kind never runs (DeepSpeed's own reader,
the universal conversion, our consolidation, our verification), and 2 real ranks resume past a damaged newest
checkpoint, stop together with one clear error when none is usable, and resume on 1 rank through the
universal path past hostile files. (The damage modes one by one: tests/train/checkpoint/test_integrity.py.)"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from albef_ds.train.runtime import EXIT_PREEMPTED
from tests.helpers import launch_deepspeed, tiny_synth_set
from tests.train.checkpoint.damage import forge_manifest, plant_payload, truncate

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")
S1, S2 = "step_00000001", "step_00000002"
OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
KINDS = ["mp_rank_00_model_states.pt", OPTIM.format(0), OPTIM.format(1)]


def _launch(ranks: int, overrides: list[str]):
    return launch_deepspeed(
        ranks, ["pretrain", "--config", CFG, "train.engine=deepspeed", *overrides], threads=1
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder with checkpoints step 1 and step 2 of a 2-rank run, its overrides)."""
    tmp = tmp_path_factory.mktemp("dsintegrity")
    common = [
        *tiny_synth_set(tmp / "synth"),
        "train.batch_size=8",
        "train.max_steps=3",
        "train.save_every=1",
        "train.log_every=1",
        "train.eval_at_start=false",
        "train.eval_at_end=false",
        "data.num_workers=0",
    ]
    out = _launch(2, [*common, f"train.output_dir={tmp / 'run'}", "train.stop_at_step=2"])
    assert out.returncode == EXIT_PREEMPTED, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp / "run" / "checkpoints" / "latest").read_text().strip() == S2
    return tmp / "run", common


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst / "checkpoints"


def _live(path: Path, canary: Path) -> None:
    """The planted payload runs under a plain torch.load (else the test would prove nothing)."""
    torch.load(path, map_location="cpu", weights_only=False)
    assert canary.exists()
    canary.unlink()


@pytest.mark.parametrize("kind", KINDS)
def test_a_payload_in_each_deepspeed_file_never_runs(run, tmp_path, kind):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from albef_ds.train.checkpoint.integrity import verify_checkpoint, weights_only_loads
    from albef_ds.train.checkpoint.weights import consolidate_deepspeed
    from albef_ds.train.engine import convert_to_universal

    root, canary = _copy(run[0], tmp_path / "run"), tmp_path / "canary"
    folder = root / S2
    shutil.copy(folder / kind, tmp_path / kind)
    plant_payload(tmp_path / kind, canary)
    _live(tmp_path / kind, canary)
    shutil.copy(tmp_path / kind, folder / kind)
    forge_manifest(folder)

    with pytest.raises(ValueError, match=str(folder / kind)):
        verify_checkpoint(folder)
    with weights_only_loads(), pytest.raises(ValueError, match=str(folder / kind)):
        TorchCheckpointEngine().load(str(folder / kind), map_location="cpu")  # what load_checkpoint calls
    assert torch.load is torch.serialization.load and not canary.exists()  # restored on exit
    with pytest.raises(ValueError, match=kind):
        convert_to_universal(folder, root / "universal" / S2)
    with pytest.raises(ValueError, match=kind):
        consolidate_deepspeed(folder)  # our zero_to_fp32-style read (export, load_weights)
    assert not canary.exists()


@pytest.mark.slow
def test_two_ranks_resume_past_a_damaged_newest_checkpoint(run, tmp_path):
    src, common = run
    root = _copy(src, tmp_path / "run")
    truncate(root / S2 / OPTIM.format(1))  # one rank's partition torn
    out = _launch(2, [*common, f"train.output_dir={tmp_path / 'run'}", "train.resume=auto"])
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert str(root / S2 / OPTIM.format(1)) in log and "RESUMING FROM AN OLDER CHECKPOINT" in log
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["resumed_from"] == S1 and results["steps"] == 3
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert (root / "rejected" / S2).is_dir()


@pytest.mark.slow
def test_two_ranks_stop_together_when_no_checkpoint_is_usable(run, tmp_path):
    """A payload in the newest (manifest forged), a torn model file in the older one: both ranks exit at
    once with the same error naming both files, and the payload never runs."""
    src, common = run
    root, canary = _copy(src, tmp_path / "run"), tmp_path / "canary"
    plant_payload(root / S2 / OPTIM.format(1), canary)
    forge_manifest(root / S2)
    truncate(root / S1 / "mp_rank_00_model_states.pt")
    t0 = time.monotonic()
    out = _launch(2, [*common, f"train.output_dir={tmp_path / 'run'}", "train.resume=auto"])
    elapsed = time.monotonic() - t0
    log = out.stdout + out.stderr
    assert out.returncode == 2, log[-4000:]
    errors = [line for line in log.splitlines() if "albef-ds: error: cannot resume" in line]
    assert len(errors) == 2, log[-4000:]  # each rank says it, and both say the same
    assert str(root / S2 / OPTIM.format(1)) in errors[0] and str(root / S1 / "mp_rank_00") in errors[0]
    assert errors[0].split("albef-ds: error: ")[1] == errors[1].split("albef-ds: error: ")[1]
    assert not canary.exists()
    assert elapsed < 120, elapsed
    assert (root / S1).is_dir() and (root / S2).is_dir()  # nothing deleted


@pytest.mark.slow
def test_one_rank_universal_resume_refuses_payloads_and_converts_again(run, tmp_path):
    """Resuming the 2-rank checkpoints on 1 rank (the universal path): the newest holds a payload (it is
    rejected, step 1 is used), and a universal conversion of step 1 left by an earlier attempt holds payloads
    with its manifest forged (it is converted again); the payloads never run."""
    from albef_ds.train.engine import convert_to_universal

    src, common = run
    root, canary = _copy(src, tmp_path / "run"), tmp_path / "canary"
    plant_payload(root / S2 / "mp_rank_00_model_states.pt", canary)
    forge_manifest(root / S2)
    uni = convert_to_universal(root / S1, root / "universal" / S1)
    for f in (uni / "mp_rank_00_model_states.pt", next(uni.glob("zero/*/fp32.pt"))):
        plant_payload(f, canary)
    forge_manifest(uni)
    out = _launch(1, [*common, f"train.output_dir={tmp_path / 'run'}", "train.resume=auto"])
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert str(root / S2 / "mp_rank_00_model_states.pt") in log
    assert f"universal checkpoint {uni} is damaged" in log and "loaded the universal checkpoint" in log
    assert json.loads((tmp_path / "run" / "results.json").read_text())["resumed_from"] == S1
    assert not canary.exists()
