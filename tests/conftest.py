"""Fixed seeds for every test (STYLE.md: seeds fixed in an autouse fixture)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process runs that form a process group export RANK, LOCAL_WORLD_SIZE, MASTER_PORT, ... into
    os.environ; a later launcher child would inherit them. Each test starts from the environment the one
    before it found."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


def _ds_segments() -> set[str]:
    from albef_ds.train.engine import DS_SHM_PREFIX, SHM_DIR

    return {p.name for p in SHM_DIR.glob(f"{DS_SHM_PREFIX}_*")} if SHM_DIR.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def _shm_at_start() -> set[str]:
    return _ds_segments()


@pytest.fixture(autouse=True)
def _no_shared_memory_left(_shm_at_start):
    """A CPU DeepSpeed run must not leave its all-reduce segments in /dev/shm (they hold RAM until reboot;
    a suite's worth once filled the machine). Any new one, whether a test or the module-scoped run it used
    made it, fails that test and is removed."""
    from albef_ds.train.engine import SHM_DIR

    yield
    left = sorted(_ds_segments() - _shm_at_start)
    for name in left:
        (SHM_DIR / name).unlink(missing_ok=True)
    if left:
        pytest.fail(f"{len(left)} DeepSpeed shared-memory segment(s) were left in {SHM_DIR}: {left}")
