"""Fixed seeds for every test (STYLE.md: seeds fixed in an autouse fixture)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import Pretrained

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def demo_pretrained(tmp_path_factory) -> Pretrained:
    """The demo's pre-training in full, made once per session: `albef-ds data synth` + `albef-ds pretrain
    --config configs/debug.yaml` as it is (4,000 two-object images, 800 steps, one process; about 100 s on 2
    cores), with an evaluation before the first step. The README's main job (tests/test_cli_end_to_end.py
    checks what it learned and that its ITM re-rank beats ITC), and the start of the tests that need the
    demo's model: the pair probe (tests/bench/test_debug_probe.py) and grounding end to end."""
    from albef_ds.cli import main

    tmp = tmp_path_factory.mktemp("demo_pretrained")
    synth = tmp / "synth"
    common = [f"data.tokenizer={synth / 'vocab.txt'}", "data.num_workers=0", "train.tensorboard=false"]
    pre = [
        *common,
        f"data.synth.out_dir={synth}",
        f"data.train_file=[{synth / 'train.json'}]",
        f"data.eval_file={synth / 'eval.json'}",
        f"train.output_dir={tmp / 'run'}",
        "train.eval_at_start=true",
    ]
    dbg = str(ROOT / "configs/debug.yaml")
    assert main(["data", "synth", "--config", dbg, *pre]) == 0
    assert main(["pretrain", "--config", dbg, *pre]) == 0
    return Pretrained(synth, tmp / "run", common, pre)
