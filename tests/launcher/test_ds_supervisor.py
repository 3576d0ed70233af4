"""The supervisor of `albef-ds launch deepspeed` (albef_ds/launcher/ds_run.py) on a stand-in process tree with
DeepSpeed's signal behaviour (fake_ds_tree.py: runner -> launch -> 2 ranks): a signal at every level reaches
every rank, each "checkpoints" once, the supervisor exits 85 and no process is left; failures keep their
status; stragglers are killed. The real DeepSpeed tree: tests/train/test_launch_signals.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from albef_ds.launcher import ds_run
from albef_ds.launcher.ds_run import EXIT_PREEMPTED, STATUS_ENV, exit_code, group_members, record_exit

from albef_ds.cli import main
from albef_ds.train import runtime

FAKE = Path(__file__).with_name("fake_ds_tree.py")
ROOT = Path(__file__).resolve().parents[2]


def _start(tmp: Path, *fake_args: str, grace: float = 5, resend: float = 20) -> subprocess.Popen:
    """The supervisor in a process of its own (it reaps every child it has), over the fake runner."""
    code = (
        "import logging, sys; from albef_ds.launcher.ds_run import Supervisor; "
        "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        f"sys.exit(Supervisor(sys.argv[1:], grace_seconds={grace}, resend_seconds={resend}, "
        "poll_seconds=0.05).run())"
    )
    cmd = [sys.executable, "-c", code, sys.executable, str(FAKE), "runner", str(tmp), *fake_args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(*paths: Path, timeout: float = 20) -> None:
    t0 = time.time()
    while not all(p.exists() for p in paths):
        assert time.time() - t0 < timeout, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.02)


def _pid(tmp: Path, name: str) -> int:
    return int((tmp / f"{name}.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _finish(sup: subprocess.Popen, tmp: Path, timeout: float = 30) -> tuple[int, str]:
    out = sup.communicate(timeout=timeout)[0]
    left = [n for n in ("runner", "launch", "rank0", "rank1") if (tmp / f"{n}.pid").exists()]
    alive = [n for n in left if _alive(_pid(tmp, n))]
    assert not alive, (alive, out)  # nothing outlives the supervisor
    return sup.returncode, out


@pytest.mark.parametrize(
    "level", ["supervisor", "supervisor-int", "runner", "launch", "rank", "runner-group"]
)
def test_a_signal_at_any_level_checkpoints_every_rank_once_and_exits_85(tmp_path, level):
    sup = _start(tmp_path)
    _wait_for(tmp_path / "rank0.ready", tmp_path / "rank1.ready")
    target = {
        "supervisor": (sup.pid, signal.SIGTERM),
        "supervisor-int": (sup.pid, signal.SIGINT),
        "runner": (_pid(tmp_path, "runner"), signal.SIGTERM),  # dies at once, as DeepSpeed's does
        "launch": (_pid(tmp_path, "launch"), signal.SIGTERM),  # terminates the ranks, then exits 1
        "rank": (_pid(tmp_path, "rank1"), signal.SIGTERM),
    }
    if level == "runner-group":
        os.killpg(_pid(tmp_path, "runner"), signal.SIGTERM)  # everything under the supervisor
    else:
        os.kill(*target[level])
    rc, out = _finish(sup, tmp_path)
    assert rc == EXIT_PREEMPTED, out
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.saved").exists(), out  # each rank "checkpointed", once (then exited)
    if level.startswith("supervisor") or level == "runner":
        # the ranks heard it from the supervisor, as USR1
        assert {(tmp_path / f"rank{r}.saved").read_text() for r in (0, 1)} == {"SIGUSR1"}, out
        assert "asking every rank to checkpoint and stop" in out
    if level == "runner":
        assert "the deepspeed runner died of SIGTERM" in out


def test_a_rank_still_starting_up_ignores_usr1_and_gets_it_again(tmp_path):
    """USR1 reaches the ranks ignored (inherited from the supervisor) before their loop runs, so an early
    signal neither kills them nor is lost: the supervisor repeats it."""
    sup = _start(tmp_path, "--startup", "1.0", resend=0.3)
    _wait_for(tmp_path / "rank0.pid", tmp_path / "rank1.pid")
    sup.send_signal(signal.SIGTERM)
    assert not any((tmp_path / f"rank{r}.ready").exists() for r in (0, 1))  # sent during start-up
    rc, out = _finish(sup, tmp_path)
    assert rc == EXIT_PREEMPTED, out
    # a repeat reached a rank in its loop (the fake ranks do not vote: launch may stop the other with TERM)
    saved = [(tmp_path / f"rank{r}.saved") for r in (0, 1)]
    assert "SIGUSR1" in {p.read_text() for p in saved if p.exists()}, out


def test_a_failing_rank_keeps_its_status(tmp_path):
    """Rank 1 fails (3); launch terminates rank 0, which exits 85: the failure wins, nothing is requeued."""
    sup = _start(tmp_path, "--fail", "1")
    rc, out = _finish(sup, tmp_path)
    assert rc == 3, out


def test_a_finished_run_exits_0(tmp_path):
    sup = _start(tmp_path, "--steps", "2")
    rc, out = _finish(sup, tmp_path)
    assert rc == 0, out
    assert "rank statuses {0: 0, 1: 0}: exit 0" in out


def test_processes_left_behind_are_killed_after_the_grace_period(tmp_path):
    """launch exits at once and leaves its ranks; rank 1 ignores every signal: the supervisor asks, waits
    grace_seconds after the runner is gone, then kills what is left, and returns."""
    t0 = time.time()
    sup = _start(tmp_path, "--leak", "--stubborn", "--steps", "2", grace=1.5)
    rc, out = _finish(sup, tmp_path)
    assert "1 process(es) of the run still alive 1.5 s after the runner exited: killing them" in out
    assert time.time() - t0 < 15
    # rank 0 finished (0), rank 1 never reported: the runner's 0 with a rank missing is not a success
    assert rc == 1, out


def test_a_second_sigint_kills_the_run_at_once(tmp_path):
    sup = _start(tmp_path, "--save", "60")  # a "checkpoint" that would take a minute
    _wait_for(tmp_path / "rank0.ready", tmp_path / "rank1.ready")
    sup.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sup.send_signal(signal.SIGINT)
    rc, out = _finish(sup, tmp_path, timeout=15)
    assert "second SIGINT" in out
    assert rc == 128 + signal.SIGKILL, out


# ---------------------------------------------------------------------------------------------- units
def test_exit_code_verdicts():
    def rep(*codes: int, world: int = 2) -> dict:
        return {r: {"exit": c, "world_size": world} for r, c in enumerate(codes)}

    assert exit_code(1, rep(85, 85)) == EXIT_PREEMPTED  # launch.py after a SIGTERM says 1
    assert exit_code(0, rep(85)) == EXIT_PREEMPTED  # rank 1 killed by launch.py after the checkpoint
    assert exit_code(85, rep(85, 3)) == 3  # a failure is never hidden behind a requeue
    assert exit_code(1, rep(2, 85)) == 2
    assert exit_code(0, rep(0, 0)) == 0
    assert exit_code(0, rep(0)) == 1  # the launcher says fine, but a rank vanished
    assert exit_code(-15, {}) == 128 + 15  # no reports: the runner's status as a shell shows it
    assert exit_code(7, {}) == 7 and exit_code(0, {}) == 0 and exit_code(None, {}) == 1


def test_exit_preempted_matches_the_trainer():
    assert ds_run.EXIT_PREEMPTED == runtime.EXIT_PREEMPTED


def test_record_exit_writes_the_rank_report(tmp_path):
    assert record_exit(85, {}) is None  # not supervised: nothing written
    p = record_exit(85, {STATUS_ENV: str(tmp_path), "RANK": "3", "WORLD_SIZE": "4"})
    assert p == tmp_path / "rank3.json"
    assert json.loads(p.read_text()) == {"rank": 3, "world_size": 4, "exit": 85}
    assert ds_run.read_reports(tmp_path) == {3: {"exit": 85, "world_size": 4}}
    (tmp_path / "rank9.json").write_text("{not json")
    assert ds_run.read_reports(tmp_path) == {3: {"exit": 85, "world_size": 4}}  # a broken file is skipped
    # a folder that cannot be written: a warning, no exception (the run's own status must survive)
    assert record_exit(0, {STATUS_ENV: str(tmp_path / "missing" / "dir")}) is None


def test_cli_reports_its_exit_status_under_the_supervisor(tmp_path, monkeypatch):
    monkeypatch.setenv(STATUS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"rank": 1, "world_size": 2, "exit": 2}


def test_group_members_reads_proc(tmp_path):
    """Members of a process group from /proc/<pid>/stat: zombies are not members, and a command name with
    spaces and parentheses does not shift the fields."""
    for pid, stat in {
        "10": "10 (python) S 1 10 10 0",
        "11": "11 (a b) c)) R 10 10 10 0",
        "12": "12 (dead) Z 10 10 10 0",
        "13": "13 (other) S 1 13 13 0",
    }.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(stat)
    (tmp_path / "self").mkdir()
    assert sorted(group_members(10, proc=tmp_path)) == [10, 11]
    assert group_members(99, proc=tmp_path) == []


def test_command_line(capsys):
    opts, rest = ds_run._parse(["--grace-seconds", "5", "--status-dir=/x", "--", "--num_gpus", "2"])
    assert opts == {"grace_seconds": 5.0, "status_dir": Path("/x")} and rest == ["--num_gpus", "2"]
    # the first argument that is not the supervisor's starts deepspeed's
    assert ds_run._parse(["--num_gpus", "2", "--grace-seconds", "5"]) == (
        {},
        ["--num_gpus", "2", "--grace-seconds", "5"],
    )
    assert ds_run.runner_command(["--num_gpus", "2"], python="py") == [
        "py",
        "-u",
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
    ]
    assert main(["launch", "deepspeed", "--grace-seconds", "soon", "x"]) == 2
    assert "--grace-seconds: expected seconds, got 'soon'" in capsys.readouterr().err
    assert main(["launch", "deepspeed", "--resend-seconds", "0", "x"]) == 2
    assert main(["launch", "deepspeed", "--"]) == 2
    assert "no deepspeed arguments" in capsys.readouterr().err
