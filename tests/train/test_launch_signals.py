"""Signals through the DeepSpeed launcher, for real: 2 CPU ranks under `albef-ds launch deepspeed`, SIGTERM at
the two levels that matter most. Every rank checkpoints once, the command exits 85, no process of the run is
left. (The bare `deepspeed` command fails both: SIGTERM to it kills it at once while launch.py and the ranks
train on; SIGTERM to its process group returns -15 and leaves launch.py alive. The other levels run on a
stand-in tree in tests/launcher/test_ds_supervisor.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from albef_ds.train.runtime import EXIT_PREEMPTED
from tests.helpers import free_port, tiny_synth_set

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")
STEPS = 40

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return tiny_synth_set(tmp_path_factory.mktemp("sig") / "synth")


def _run_and_signal(ov: list[str], run: Path, send) -> tuple[int, str, list[psutil.Process]]:
    """`albef-ds launch deepspeed --num_gpus 2 ... pretrain` in a session of its own; once step 3 is logged,
    `send(top, runner)` signals it; returns its exit status, its output and every process the run had."""
    cmd = [sys.executable, "-m", "albef_ds.cli", "launch", "deepspeed", "--num_gpus", "2", "--no_local_rank"]
    cmd += ["--master_port", str(free_port()), "--module", "albef_ds.cli", "pretrain", "--config", CFG, *ov]
    cmd += [
        "train.engine=deepspeed",
        "train.ds_config=ds_configs/zero2_cpu.json",
        f"train.output_dir={run}",
        "train.batch_size=8",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.eval_at_start=false",
        "train.eval_at_end=false",
        "data.num_workers=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    top = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen, deadline = [], time.time() + 300
    for line in top.stdout:
        seen.append(line)
        if f"step 3/{STEPS}" in line:
            break
        assert time.time() < deadline, "no training progress: " + "".join(seen[-20:])
    tree = psutil.Process(top.pid).children(recursive=True)
    runner = next(p for p in tree if "deepspeed.launcher.runner" in p.cmdline())
    cmdlines = {p.pid: p.cmdline() for p in tree}
    ds = {pid for pid, c in cmdlines.items() if any(a.startswith("deepspeed.launcher") for a in c)}
    ranks = [pid for pid, c in cmdlines.items() if "albef_ds.cli" in c and pid not in ds]
    assert len(ranks) == 2 and len(ds) == 2, cmdlines  # runner, launch.py and the two ranks
    send(top, runner)
    rest = top.communicate(timeout=300)[0]
    return top.returncode, "".join(seen) + rest, tree


def _check_one_checkpoint_per_rank(run: Path, log: str, rc: int, procs: list[psutil.Process]) -> None:
    assert rc == EXIT_PREEMPTED, log[-4000:]
    # nothing of the run outlives the command (a zombie is not running: its parent is gone too)
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    # one checkpoint, written by both ranks together, after the same step; then no final save
    ckpt = run / "checkpoints"
    tags = sorted(p.name for p in ckpt.glob("step_*"))
    assert len(tags) == 1 and (ckpt / "latest").read_text().strip() == tags[0], tags
    stopped = int(tags[0].split("_")[1])
    assert 3 < stopped < STEPS
    files = {p.name for p in (ckpt / tags[0]).iterdir()}
    for r in (0, 1):
        assert {f"rng_rank{r}.pt", f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"} <= files, files
    stops = re.findall(r"(\[rank 1\] )?\S+: stopped after step (\d+) with a checkpoint", log)
    assert sorted(stops) == [("", str(stopped)), ("[rank 1] ", str(stopped))], stops  # once per rank
    assert not (run / "checkpoint.pt").exists() and not (run / "results.json").exists()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, stopped + 1))


def test_sigterm_to_the_command_and_its_process_group(data_overrides, tmp_path):
    """SIGTERM to the process group the shell sees (the command's: Ctrl-C or `kill -- -PGID` do the same):
    the runner lives in a session of its own, so the supervisor alone gets it and passes it on as USR1."""
    run = tmp_path / "run"

    def send(top, runner):
        assert os.getpgid(runner.pid) != os.getpgid(top.pid)
        os.killpg(os.getpgid(top.pid), signal.SIGTERM)

    rc, log, procs = _run_and_signal(data_overrides, run, send)
    _check_one_checkpoint_per_rank(run, log, rc, procs)
    assert "SIGTERM: asking every rank to checkpoint and stop" in log
    assert log.count("received SIGUSR1: stopping after this step") == 2


def test_sigterm_to_the_runners_whole_process_group(data_overrides, tmp_path):
    """SIGTERM to every process under the command (runner, launch.py, ranks): the runner dies at once,
    launch.py terminates the ranks and exits 1; the ranks' own reports make the command exit 85."""
    run = tmp_path / "run"
    rc, log, procs = _run_and_signal(
        data_overrides, run, lambda top, runner: os.killpg(runner.pid, signal.SIGTERM)
    )
    _check_one_checkpoint_per_rank(run, log, rc, procs)
    assert "the deepspeed runner died of SIGTERM" in log
    assert "received SIGTERM: stopping after this step" in log
