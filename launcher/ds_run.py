"""`albef-ds launch deepspeed ARGS`: DeepSpeed's runner under a supervisor that makes a signal mean "every
rank checkpoints once, the run exits 85" at whichever level it arrives.

Why: the bare `deepspeed` command (deepspeed.launcher.runner) installs no signal handler on one node,
so SIGTERM kills it at once while its `deepspeed.launcher.launch` child and the ranks train on without a
parent; SIGTERM to launch.py terminates the ranks (they checkpoint and exit 85) but launch.py then exits 1; a
signal to the whole process group ends the runner at once (-15) while launch.py lives on. Neither DeepSpeed
process reports a rank's "preempted" status reliably (the runner drops negative statuses, launch.py exits 1
after a signal), so the ranks report it themselves.

What the supervisor does:
- starts the runner in a session and process group of its own (a signal to the caller's terminal or process
  group reaches the supervisor only), with SIGUSR1 ignored: the runner, launch.py and every rank inherit that,
  and a rank handles USR1 only inside its training loop (the trainer installs its handler there);
- turns SIGTERM, SIGINT, SIGHUP and SIGUSR1 into SIGUSR1 for the whole group, repeated every
  `resend_seconds` until the runner has exited (a rank still starting up ignores it and takes the next one);
  the ranks finish their step, agree to stop (the trainer's stop vote), write one checkpoint and exit 85;
  a second SIGINT kills the group at once;
- treats the runner dying of a signal (someone killed it or its group) the same way: the ranks it leaves
  behind are asked to checkpoint;
- waits for every process of the group, not only the runner (with Linux's child-subreaper flag, orphans
  become its children and are reaped); `grace_seconds` after the runner has exited it kills what is left;
- exits with the ranks' verdict: each rank writes `rank<N>.json` (its exit status and world size) into the
  folder named by ALBEF_DS_STATUS_DIR (albef_ds.cli does, through `record_exit`); a failure status of any
  rank wins, then 85 when any rank checkpointed and exited 85, then 0 when every rank finished; without
  reports the runner's own status (128 + N when it died of signal N).

This module uses the standard library only: the sbatch script starts it before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 85  # albef_ds.train.runtime.EXIT_PREEMPTED (a test keeps them equal)
STATUS_ENV = "ALBEF_DS_STATUS_DIR"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
FORWARDED = signal.SIGUSR1  # what the ranks get: the runner and launch.py inherit it ignored
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
USAGE = (
    "usage: albef-ds launch deepspeed [--grace-seconds S] [--resend-seconds S] [--status-dir DIR] [--] "
    "DEEPSPEED_ARGS...\n"
    "  DEEPSPEED_ARGS are what `deepspeed` takes, e.g. --num_gpus 2 --no_local_rank --module albef_ds.cli "
    "pretrain --config configs/debug.yaml"
)


# ---------------------------------------------------------------------------------------------- rank side
def _env_world_size(env: Mapping[str, str]) -> int:
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 1


def _env_rank(env: Mapping[str, str]) -> int:
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def record_exit(code: int, environ: Mapping[str, str] | None = None) -> Path | None:
    """Under the supervisor (ALBEF_DS_STATUS_DIR set): write this rank's exit status for it, atomically.
    Returns the file written, None when not supervised. Never raises: a report that cannot be written
    makes the supervisor fall back to the launcher's status, it must not turn a finished run into a crash."""
    env = os.environ if environ is None else environ
    folder = env.get(STATUS_ENV, "")
    if not folder:
        return None
    rank = _env_rank(env)
    path = Path(folder) / f"rank{rank}.json"
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"rank": rank, "world_size": _env_world_size(env), "exit": int(code)}))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the exit status for the launcher to %s: %s", path, e)
        return None
    return path


def read_reports(folder: Path) -> dict[int, dict]:
    """The ranks' reports in `folder`, by rank; unreadable files are skipped (named in a warning)."""
    reports: dict[int, dict] = {}
    for p in sorted(folder.glob("rank*.json")):
        try:
            rep = json.loads(p.read_text())
            reports[int(rep["rank"])] = {"exit": int(rep["exit"]), "world_size": int(rep["world_size"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable rank report %s: %s", p, e)
    return reports


# ---------------------------------------------------------------------------------------------- verdict
def exit_code(runner_code: int | None, reports: Mapping[int, Mapping[str, int]]) -> int:
    """The supervisor's exit status from the runner's status (negative: died of that signal; None: never
    reaped) and the ranks' reports.

    A rank's failure (neither 0 nor 85) wins, the lowest rank's first: other ranks' 85 or a launcher's
    1 would hide it. Else 85 when any rank exited 85: that rank returned only after the checkpoint was
    complete on every rank (the trainer's save is collective), and launch.py may have killed the others
    while they shut down. Else 0 when every rank of the world reported 0. Else (ranks missing, or a
    command that does not report) the runner's status, as a shell would show it."""
    codes = [reports[r]["exit"] for r in sorted(reports)]
    failures = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    if failures:
        return failures[0]
    if EXIT_PREEMPTED in codes:
        return EXIT_PREEMPTED
    world = max((rep["world_size"] for rep in reports.values()), default=0)
    if codes and len(codes) >= world:
        return 0
    if runner_code is None:
        return 1
    if runner_code < 0:
        return 128 - runner_code
    if runner_code == 0 and codes:
        return 1  # the launcher says fine, but ranks died without a word
    return runner_code


# ---------------------------------------------------------------------------------------------- processes
def group_members(pgid: int, proc: Path = Path("/proc")) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc (Linux)."""
    if not proc.is_dir():  # elsewhere: only "some member is there or not"
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(d.name))
    return members


def _become_subreaper() -> bool:
    """Orphaned descendants (launch.py and the ranks once the runner is gone) become this process's
    children, so they are reaped here instead of lingering as zombies under an init that does not reap."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _ignore_forwarded() -> None:  # in the child, before exec: the disposition survives exec
    signal.signal(FORWARDED, signal.SIG_IGN)


def runner_command(args: Sequence[str], python: str | None = None) -> list[str]:
    """The bare `deepspeed ARGS` (deepspeed.launcher.runner) as this interpreter runs it."""
    return [python or sys.executable, "-u", "-m", "deepspeed.launcher.runner", *args]


@dataclass
class Supervisor:
    """Run `command` (the deepspeed runner) as the leader of a new process group; see the module docstring."""

    command: list[str]
    status_dir: Path | None = None  # None: a temporary folder, removed at the end
    grace_seconds: float = 120.0  # after the runner exited: how long what is left of its group may finish
    resend_seconds: float = 20.0  # while stopping: how often the ranks are signalled again
    poll_seconds: float = 0.2
    env: Mapping[str, str] | None = None
    stop_signal: int | None = field(default=None, init=False)  # what asked for the stop, once one did
    _interrupts: int = field(default=0, init=False)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
        if self.stop_signal is None:
            self.stop_signal = signum

    def run(self) -> int:
        own_dir = self.status_dir is None
        folder = Path(tempfile.mkdtemp(prefix="albef-ds-status-")) if own_dir else Path(self.status_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("rank*.json"):  # a previous start's reports (a requeued job)
            stale.unlink()
        env = dict(os.environ if self.env is None else self.env)
        env[STATUS_ENV] = str(folder)
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        _become_subreaper()
        try:
            runner = subprocess.Popen(
                self.command, env=env, start_new_session=True, preexec_fn=_ignore_forwarded
            )
            log.info("[albef-ds launch] deepspeed runner pid %d (its own process group)", runner.pid)
            runner_code = self._supervise(runner)
            reports = read_reports(folder)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if own_dir:
                shutil.rmtree(folder, ignore_errors=True)
        code = exit_code(runner_code, reports)
        log.info(
            "[albef-ds launch] runner status %s, rank statuses %s: exit %d",
            runner_code,
            {r: rep["exit"] for r, rep in sorted(reports.items())} or "none reported",
            code,
        )
        return code

    def _reap(self, runner: subprocess.Popen) -> None:
        """Collect every child that has ended (the runner and reparented orphans)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == runner.pid:
                runner.returncode = os.waitstatus_to_exitcode(status)

    def _signal_group(self, pgid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)

    def _supervise(self, runner: subprocess.Popen) -> int | None:
        pgid = runner.pid
        sent_at: float | None = None  # when the ranks were last asked to stop
        runner_gone_at: float | None = None
        killed = False
        while True:
            self._reap(runner)
            now = time.monotonic()
            if runner.returncode is not None and runner_gone_at is None:
                runner_gone_at = now
                if runner.returncode < 0 and self.stop_signal is None and group_members(pgid):
                    # killed from outside (the runner alone, or its whole group): what it started lives on
                    self.stop_signal = -runner.returncode
                    log.warning(
                        "[albef-ds launch] the deepspeed runner died of %s; asking the ranks it left to "
                        "checkpoint and stop",
                        signal.Signals(-runner.returncode).name,
                    )
            members = group_members(pgid)
            if runner.returncode is not None and not members:
                return runner.returncode
            if self._interrupts >= 2 and not killed:
                log.warning("[albef-ds launch] second SIGINT: killing every process of the run now")
                self._signal_group(pgid, signal.SIGKILL)
                killed = True
            if self.stop_signal is not None and not killed:
                if sent_at is None or now - sent_at >= self.resend_seconds:
                    if sent_at is None:
                        log.warning(
                            "[albef-ds launch] %s: asking every rank to checkpoint and stop (%s to the "
                            "runner's process group, repeated every %g s until it has exited)",
                            signal.Signals(self.stop_signal).name,
                            signal.Signals(FORWARDED).name,
                            self.resend_seconds,
                        )
                    self._signal_group(pgid, FORWARDED)
                    sent_at = now
            if runner_gone_at is not None and now - runner_gone_at >= self.grace_seconds and not killed:
                log.warning(
                    "[albef-ds launch] %d process(es) of the run still alive %g s after the runner exited: "
                    "killing them (pids %s)",
                    len(members),
                    self.grace_seconds,
                    members,
                )
                self._signal_group(pgid, signal.SIGKILL)
                killed = True
            if killed and runner_gone_at is not None and now - runner_gone_at >= self.grace_seconds + 10:
                # SIGKILL cannot fail on our own processes; only an unkillable one (D state) stays
                log.error("[albef-ds launch] processes %s survive SIGKILL; giving up on them", members)
                return runner.returncode
            time.sleep(self.poll_seconds)


# ---------------------------------------------------------------------------------------------- command
def _parse(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """The supervisor's own options come first (optionally ended by `--`); the rest goes to deepspeed."""
    opts: dict = {}
    names = {"--grace-seconds": "grace_seconds", "--resend-seconds": "resend_seconds"}
    i, argv = 0, list(argv)
    while i < len(argv):
        a = argv[i]
        key, _, value = a.partition("=")
        if a == "--":
            i += 1
            break
        if key in names or key == "--status-dir":
            if not value:
                if i + 1 >= len(argv):
                    raise ValueError(f"{key} needs a value")
                value = argv[i + 1]
                i += 1
            if key == "--status-dir":
                opts["status_dir"] = Path(value)
            else:
                try:
                    opts[names[key]] = float(value)
                except ValueError:
                    raise ValueError(f"{key}: expected seconds, got {value!r}") from None
                if opts[names[key]] <= 0:
                    raise ValueError(f"{key}: expected seconds > 0, got {value!r}")
            i += 1
            continue
        break
    return opts, argv[i:]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        opts, rest = _parse(argv)
    except ValueError as e:
        print(f"albef-ds launch deepspeed: error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    if not rest:
        print(f"albef-ds launch deepspeed: error: no deepspeed arguments\n{USAGE}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%X")
    return Supervisor(runner_command(rest), **opts).run()


if __name__ == "__main__":
    sys.exit(main())
