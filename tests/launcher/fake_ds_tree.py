"""A stand-in for DeepSpeed's process tree (runner -> launch -> ranks) with its signal behaviour, for the
supervisor's tests (tests/launcher/test_ds_supervisor.py); the real tree is tested in
tests/train/test_launch_signals.py.

    fake_ds_tree.py runner DIR [options]   like deepspeed.launcher.runner on one node: no handlers; exits
                                           with launch's status when it is > 0, else 0
    fake_ds_tree.py launch DIR [options]   like deepspeed.launcher.launch: SIGTERM/SIGINT terminate the
                                           ranks, wait for them, exit 1; the first rank to fail makes it
                                           terminate the others and exit with that rank's status
    fake_ds_tree.py rank DIR N [options]   a training rank: ignores what it inherited until its "loop"
                                           starts after --startup s, then SIGTERM/SIGUSR1 make it "checkpoint"
                                           (--save s) and exit 85; it finishes (0) after --steps x 0.05 s

Every process writes DIR/<role>[N].pid at start; a rank writes DIR/rankN.ready when its loop starts and
reports its exit through the real albef_ds.launcher.ds_run.record_exit. --fail N: rank N exits 3 when its
loop starts; --stubborn: rank 1 ignores every signal it can (it only dies of SIGKILL); --leak: launch starts
the ranks and exits 0 at once, leaving them behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from albef_ds.launcher.ds_run import record_exit

RANKS = 2


def _pidfile(d: Path, name: str) -> None:
    (d / f"{name}.pid").write_text(str(os.getpid()))


def _runner(a, rest: list[str]) -> int:
    child = subprocess.Popen([sys.executable, __file__, "launch", str(a.dir), *rest])
    child.wait()
    return child.returncode if child.returncode > 0 else 0  # as DeepSpeed's runner: negatives dropped


def _launch(a, rest: list[str]) -> int:
    env = dict(os.environ)
    ranks = []
    for r in range(RANKS):
        env["RANK"], env["WORLD_SIZE"] = str(r), str(RANKS)
        ranks.append(subprocess.Popen([sys.executable, __file__, "rank", str(a.dir), str(r), *rest], env=env))
    if a.leak:
        return 0

    def stop(signum, frame):
        for p in ranks:
            if p.poll() is None:
                p.terminate()
        for p in ranks:
            p.wait()
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    alive = set(ranks)
    while alive:
        for p in list(alive):
            if p.poll() is None:
                continue
            if p.returncode != 0:
                for q in ranks:
                    if q.poll() is None:
                        q.terminate()
                for q in ranks:
                    q.wait()
                return p.returncode
            alive.discard(p)
        time.sleep(0.05)
    return 0


def _rank(a) -> int:
    if a.stubborn and a.n == 1:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        while True:
            time.sleep(1)
    time.sleep(a.startup)  # start-up: the inherited dispositions apply (USR1 ignored under the supervisor)
    stop: list[int] = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    (a.dir / f"rank{a.n}.ready").write_text("")
    if a.fail == a.n:
        record_exit(3)
        return 3
    for _ in range(a.steps):
        if stop:
            time.sleep(a.save)
            (a.dir / f"rank{a.n}.saved").write_text(signal.Signals(stop[0]).name)
            record_exit(85)
            return 85
        time.sleep(0.05)
    record_exit(0)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("runner", "launch", "rank"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("n", type=int, nargs="?", default=-1)
    ap.add_argument("--startup", type=float, default=0.0)
    ap.add_argument("--save", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--fail", type=int, default=-1)
    ap.add_argument("--stubborn", action="store_true")
    ap.add_argument("--leak", action="store_true")
    a = ap.parse_args()
    rest = sys.argv[3 + (a.role == "rank") :]
    _pidfile(a.dir, a.role if a.role != "rank" else f"rank{a.n}")
    if a.role == "runner":
        return _runner(a, rest)
    if a.role == "launch":
        return _launch(a, rest)
    return _rank(a)


if __name__ == "__main__":
    sys.exit(main())
