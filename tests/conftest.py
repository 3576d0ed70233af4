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
