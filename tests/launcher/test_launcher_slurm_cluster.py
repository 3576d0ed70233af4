"""`albef-ds launch slurm` against a real two-node SLURM on this machine (scripts/slurm_local.sh): debug
ALBEF, DeepSpeed ZeRO-2, one CPU rank per node.

- a job with a hostile name and run folder, signalled mid-run (`scancel --batch --signal=USR1`, the path
  SLURM's `--signal=B:USR1@N` time-limit warning takes), checkpoints, requeues itself, resumes and finishes
  with every step trained exactly once;
- the deepspeed-launcher mode finishes and is not requeued;
- a crash is not requeued; a preempted job past --max-restarts is not requeued either.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from albef_ds.cli import main

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")
DS = str(ROOT / "ds_configs/zero2_cpu.json")
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
HOSTILE_NAME = (
    """albef"; touch pwned_name; echo "$(touch pwned_sub) `touch pwned_tick` ' ; touch pwned_semi # z"""
)
HOSTILE_DIR = """run 'q' "dq" $(touch pwned_dir) ; touch pwned_semi2 `touch pwned_tick2`"""

pytestmark = pytest.mark.slow


def _launch(workdir: Path, jobs: list[str], output: str, *extra: str) -> tuple[Path, str]:
    """Submit through the real CLI; returns (run folder, job id)."""
    opts = [x for x in extra if "=" not in x or x.startswith("-")]
    overrides = [x for x in extra if x not in opts]
    rc = main(
        [
            "launch",
            "slurm",
            "--config",
            CFG,
            "--ds-config",
            DS,
            "--workdir",
            str(workdir),
            "--output",
            output,
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            *opts,
            *overrides,
        ]
    )
    assert rc == 0
    run = workdir / output
    job = (run / "launch" / "job_id").read_text().strip()
    jobs.append(job)
    return run, job


def _job(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True)
    fields: dict[str, str] = {}
    for tok in out.stdout.split():
        k, _, v = tok.partition("=")
        fields.setdefault(k, v)
    # JobName may hold spaces: take it whole, up to the next field
    line = out.stdout
    start = line.index("JobName=") + len("JobName=")
    fields["JobName"] = line[start : line.index(" UserId=", start)]
    return fields


def _wait_end(job: str, timeout: float = 300) -> dict[str, str]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = _job(job)
        if info["JobState"] in TERMINAL:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} still {_job(job)['JobState']} after {timeout} s")


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _wait_step(run: Path, step: int, job: str, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in _records(run)):
            return
        assert _job(job)["JobState"] not in TERMINAL, (run / f"slurm-{job}.out").read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not reach step {step} in {timeout} s")


def _log(run: Path, job: str) -> str:
    return (run / f"slurm-{job}.out").read_text()


STEPS = 30


@pytest.mark.parametrize(
    "mode, how, name, folder",
    [
        # the path of SLURM's time-limit warning (--signal=B:USR1@N): the batch shell alone is signalled
        ("srun", "--batch", HOSTILE_NAME, HOSTILE_DIR),
        # the whole job (batch shell, its children, every step): the deepspeed launcher must survive it
        ("deepspeed", "--full", "albef-ds", "full signal"),
    ],
    ids=["srun-batch-signal-hostile-names", "deepspeed-full-signal"],
)
def test_preempted_job_requeues_resumes_and_finishes(
    slurm_cluster, workdir, train_overrides, mode, how, name, folder
):
    run, job = _launch(
        workdir,
        slurm_cluster,
        folder,
        "--nodes",
        "2",
        "--mode",
        mode,
        "--job-name",
        name,
        *train_overrides,
        f"train.max_steps={STEPS}",
    )
    _wait_step(run, 3, job)
    subprocess.run(["scancel", how, "--signal=USR1", job], check=True)
    info = _wait_end(job)
    log = _log(run, job)
    # finished after one requeue: a job that finishes is not requeued again
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    # hostile values: the name reached SLURM byte for byte, and nothing ran
    assert info["JobName"] == name
    for d in (workdir, run, Path.cwd()):
        assert not list(d.glob("pwned*"))

    # 2 ranks on 2 nodes, ZeRO-2
    assert (
        "0: [albef-ds launch] task 0/2 on node n1" in log
        and "1: [albef-ds launch] task 1/2 on node n2" in log
    )
    assert "distributed env (slurm): rank 0/2, local rank 0/1, node 0, master n1:" in log
    # rank 1 logs warnings only; what its discovery found is in its rank report
    dist1 = json.loads((run / "rank1.json").read_text())["dist"]
    assert (dist1["source"], dist1["rank"], dist1["local_rank"], dist1["node_rank"]) == ("slurm", 1, 0, 1)
    assert dist1["master_addr"] == "n1"
    assert "DeepSpeed ZeRO-2 on 2 ranks" in log
    # signal -> checkpoint -> requeue -> resume -> finish
    assert "USR1: asking the ranks to checkpoint and stop" in log
    assert "requeueing (requeue 1 of 3)" in log
    assert log.count("start 2 (requeues so far 1") == 1 and "training finished" in log

    recs = _records(run)
    starts = [r for r in recs if r["event"] == "start"]
    assert [s["world_size"] for s in starts] == [2, 2]
    train_steps = [r["step"] for r in recs if r["event"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))  # none repeated, none skipped
    # the second run continued from the step the first one saved
    second = recs.index(starts[1])
    saved = [r["step"] for r in recs[:second] if r["event"] == "train"][-1]
    assert 3 <= saved < STEPS
    assert f"resumed from {run}/checkpoints/step_{saved:08d}: step {saved}" in log
    assert [r["step"] for r in recs[second:] if r["event"] == "train"][0] == saved + 1
    for rank in (0, 1):
        report = json.loads((run / f"rank{rank}.json").read_text())
        assert report["steps"] == STEPS and report["world_size"] == 2
    assert (run / "checkpoint.pt").is_file()
    # the run folder holds what the job ran: script, resolved config, DeepSpeed JSON, code
    launch = run / "launch"
    assert (launch / "job.sbatch").read_text().startswith("#!/bin/bash")
    resolved = yaml.safe_load((launch / "config.yaml").read_text())
    assert resolved["train"]["output_dir"] == str(run) and resolved["train"]["resume"] == "auto"
    assert resolved["train"]["max_steps"] == STEPS and resolved["train"]["engine"] == "deepspeed"
    assert (launch / "ds_config.json").is_file()
    assert (launch / "code" / "albef_ds" / "train" / "trainer.py").is_file()
    assert (launch / "code" / "albef_ds" / "launcher" / "slurm.py").is_file()
    assert f"code {launch / 'code' / 'albef_ds'}" in log


def test_deepspeed_launcher_mode_finishes_without_requeue(slurm_cluster, workdir, train_overrides):
    run, job = _launch(
        workdir,
        slurm_cluster,
        "ds",
        "--nodes",
        "2",
        "--mode",
        "deepspeed",
        *train_overrides,
        "train.max_steps=3",
    )
    info = _wait_end(job)
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-4000:]
    assert (run / "launch" / f"hostfile.{job}").read_text() == "n1 slots=1\nn2 slots=1\n"
    assert "task 0/2 on node n1" in log and "task 1/2 on node n2" in log
    assert "DeepSpeed ZeRO-2 on 2 ranks" in log
    assert "training finished" in log and "requeue" not in log.lower().replace("requeues so far 0", "")
    assert [r["step"] for r in _records(run) if r["event"] == "train"] == [1, 2, 3]


def test_crash_is_not_requeued(slurm_cluster, workdir, train_overrides):
    # 128 pairs cannot fill one batch of 256 on the rank: the trainer stops with a config error (exit 2)
    run, job = _launch(
        workdir, slurm_cluster, "crash", "--nodes", "1", *train_overrides, "train.batch_size=256"
    )
    info = _wait_end(job)
    log = _log(run, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", log[-3000:]
    assert "training failed with exit status 2: not requeued" in log


def test_restarts_are_bounded(slurm_cluster, workdir, train_overrides):
    # every start is preempted (train.stop_at_step=1 behaves as a signal after step 1); --max-restarts 0
    run, job = _launch(
        workdir,
        slurm_cluster,
        "bounded",
        "--nodes",
        "1",
        "--max-restarts",
        "0",
        *train_overrides,
        "train.max_steps=4",
        "train.stop_at_step=1",
    )
    info = _wait_end(job)
    log = _log(run, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "85:0" and info["Restarts"] == "0", log[
        -3000:
    ]
    assert "restart limit (0) is reached: not requeued" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
