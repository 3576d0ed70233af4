"""A real two-node SLURM on this machine for the launcher tests (scripts/slurm_local.sh), started once per
session and stopped at its end, plus a small synthetic data set in a working directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from albef_ds.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
CANNOT_RUN_SLURM = 3  # slurm_local.sh: not root, or slurm-wlm/munge cannot be installed


def _status() -> bool:
    return subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local cluster (installing slurm-wlm and munge when missing); skip only where this machine
    cannot run SLURM at all. Jobs submitted through `submitted` are cancelled at the end; the cluster is
    stopped again unless it was already running before the tests."""
    was_running = _status()
    out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if out.returncode == CANNOT_RUN_SLURM:
        pytest.skip(f"no local SLURM possible on this machine: {out.stderr.strip()}")
    assert out.returncode == 0, f"scripts/slurm_local.sh start failed:\n{out.stdout}\n{out.stderr}"
    jobs: list[str] = []
    yield jobs
    if jobs:
        subprocess.run(["scancel", "--signal=KILL", *jobs], capture_output=True)
        subprocess.run(["scancel", *jobs], capture_output=True)
    if not was_running:
        out = subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A job working directory holding a 128-pair synthetic set under synth/ (referenced relatively)."""
    wd = tmp_path_factory.mktemp("launch")
    synth = wd / "synth"
    args = [f"data.synth.out_dir={synth}", "data.synth.num_train=128", "data.synth.num_eval=10"]
    assert main(["data", "synth", "--config", str(ROOT / "configs/debug.yaml"), *args]) == 0
    return wd


@pytest.fixture(scope="module")
def train_overrides() -> list[str]:
    """Tiny, fast training on top of configs/debug.yaml (paths relative to the job's working directory)."""
    return [
        "data.train_file=[synth/train.json]",
        "data.eval_file=synth/eval.json",
        "data.tokenizer=synth/vocab.txt",
        "train.batch_size=16",
        "train.log_every=1",
        "train.eval_at_start=false",
        "train.eval_at_end=false",
        "data.num_workers=1",
        "model.queue_size=20",
    ]
