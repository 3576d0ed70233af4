"""Exact resume: N steps, stop (signal or stop_at_step) with a checkpoint, resume, N more == 2N straight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from albef_ds.cli import main
from albef_ds.train.runtime import EXIT_PREEMPTED
from tests.helpers import assert_same_state

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth_resume") / "set"
    ov = [f"data.synth.out_dir={d}", "data.synth.num_train=128", "data.synth.num_eval=10"]
    assert main(["data", "synth", "--config", CFG, *ov]) == 0
    return [
        f"data.train_file=[{d / 'train.json'}]",
        f"data.eval_file={d / 'eval.json'}",
        f"data.tokenizer={d / 'vocab.txt'}",
        "train.batch_size=16",  # 8 steps per epoch: 12 steps cross an epoch boundary
        "train.max_steps=12",
        "train.log_every=1",
        "train.eval_at_start=false",
        "train.eval_at_end=false",
        "data.num_workers=1",
        "model.queue_size=20",
        "model.text.dropout=0.1",  # dropout draws from the RNG too: its state must be restored
    ]


@pytest.fixture
def one_thread():
    """Intra-op threads reduce in a varying order: two uninterrupted 4-thread runs differ by up to 5e-7 per
    step. One thread makes the comparison deterministic, so 1e-6 measures the resume, not the scheduler."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pretrain(synth: list[str], run: Path, *extra: str) -> int:
    return main(["pretrain", "--config", CFG, *synth, f"train.output_dir={run}", *extra])


def _losses(run: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["event"] == "train"}


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_single_process_resume_is_exact(tmp_path, synth, one_thread):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _pretrain(synth, straight) == 0
    assert _pretrain(synth, resumed, "train.stop_at_step=5") == EXIT_PREEMPTED
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert not (resumed / "checkpoint.pt").exists()  # stopped, not finished
    assert _pretrain(synth, resumed, "train.resume=auto") == 0
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(1, 13))
    for step in range(6, 13):
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert b[step][k] == pytest.approx(a[step][k], abs=1e-6), (step, k)
    sa, sb = _final_state(straight), _final_state(resumed)
    assert_same_state(sa, sb)  # at the CPU noise floor: see tests/helpers.py
    assert sa["queue_ptr"].item() == (12 * 16) % 20


def test_resume_auto_without_checkpoint_starts_fresh_and_bad_tag_errors(tmp_path, synth, capsys):
    run = tmp_path / "fresh"
    assert _pretrain(synth, run, "train.resume=auto", "train.max_steps=2") == 0
    assert _pretrain(synth, run, "train.resume=step_00000099") == 2
    assert "no checkpoint folder" in capsys.readouterr().err


def test_keep_last_prunes_and_latest_points_at_newest(tmp_path, synth):
    run = tmp_path / "prune"
    assert _pretrain(synth, run, "train.save_every=3", "train.keep_last=2") == 0
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000009", "step_00000012"]
    assert (root / "latest").read_text().strip() == "step_00000012"
    assert not [p for p in root.rglob(".*tmp*")]  # no half-written files left behind


def test_sigusr1_checkpoints_and_exits_for_requeue(tmp_path, synth):
    run = tmp_path / "signal"
    exe = Path(sys.executable).with_name("albef-ds")
    cmd = [str(exe), "pretrain", "--config", CFG, *synth, f"train.output_dir={run}", "train.max_steps=400"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training is under way
        if "step 3/400" in line:
            proc.send_signal(signal.SIGUSR1)
            break
        assert time.time() < deadline, "no training progress"
    rest = proc.communicate(timeout=240)[0]
    assert proc.returncode == EXIT_PREEMPTED, rest[-3000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.split("_")[1])
    assert 3 <= stopped_at < 400 and "received SIGUSR1" in rest
    rc = _pretrain(
        synth, run, "train.resume=auto", "train.max_steps=400", f"train.stop_at_step={stopped_at + 2}"
    )
    assert rc == EXIT_PREEMPTED
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at + 2:08d}"


def _mid_save(root: Path, after: int) -> str | None:
    """The tag of a checkpoint being written (its folder exists, its checksum file, written last before
    `latest` moves, does not yet) past step `after`, if there is one now."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return None
    for name in names:
        if name.startswith("step_") and int(name.split("_")[1]) > after:
            if not (root / name / "manifest.json").exists():
                return name
    return None


def test_sigkill_mid_save_resumes_exactly_from_the_last_complete_checkpoint(tmp_path, synth, one_thread):
    """SIGKILL while a checkpoint is being written (a checkpoint every step, killed the moment a folder
    without its checksum file appears): the resume ignores the torn folder, starts from the newest complete
    one, and trains what an uninterrupted run trains."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _pretrain(synth, straight) == 0
    exe = Path(sys.executable).with_name("albef-ds")
    cmd = [str(exe), "pretrain", "--config", CFG, *synth, f"train.output_dir={killed}", "train.save_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one intra-op thread, as `one_thread` gives this process
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    root, torn, deadline = killed / "checkpoints", None, time.time() + 240
    try:
        while torn is None and proc.poll() is None and time.time() < deadline:
            torn = _mid_save(root, after=3)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    assert torn is not None, "the run ended before a checkpoint was caught mid-save"
    assert proc.returncode == -signal.SIGKILL
    assert not (root / torn / "manifest.json").exists()  # it really died mid-save
    complete = (root / "latest").read_text().strip()
    assert int(complete.split("_")[1]) == int(torn.split("_")[1]) - 1
    assert _pretrain(synth, killed, "train.resume=auto", "train.save_every=1") == 0
    a, b = _losses(straight), _losses(killed)
    start = int(complete.split("_")[1])
    for step in range(start + 1, 13):
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert b[step][k] == pytest.approx(a[step][k], abs=1e-6), (step, k)
    assert_same_state(_final_state(straight), _final_state(killed))
