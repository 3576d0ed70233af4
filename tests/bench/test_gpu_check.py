"""`bash benchmarks/gpu_check.sh --dry-run`: the GPU check's five stages (pytest -m gpu, the kernel
benchmark, every throughput lever, the sync-debug steps, one NLVR2 step) at tiny sizes on this machine, so
the script that will spend the first GPU minutes has run end to end before it gets them."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert set(summary["stages"]) == {"pytest_gpu", "kernels", "throughput", "sync_debug", "nlvr2_step"}
    assert all(s["exit"] == 0 and s["result"] for s in summary["stages"].values()), summary
    # pytest -m gpu collected the GPU tests (and skipped them without a device)
    pytest_gpu = json.loads((out / "pytest_gpu.json").read_text())
    assert pytest_gpu["tests"] > 0 and not pytest_gpu["failed"]
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["dry_run"] and kernels["queue"] == 256 and kernels["ema"] and kernels["itc_memory_model"]
    throughput = json.loads((out / "throughput.json").read_text())
    recipes = [r["recipe"] for r in throughput["recipes"]]
    assert recipes == ["ours", "ours+compile", "ours+patch_dropout", "reference"]
    assert throughput["engine"] == "deepspeed" and (out / "throughput.png").stat().st_size > 0
    assert set(summary["throughput"]) == set(recipes) and "ours / reference" in summary["ratios"]
    sync = json.loads((out / "sync_debug.json").read_text())
    assert sync["steps"] == 2 and "unavailable" in sync["sync_debug_mode"]  # no CUDA here
    assert summary["syncs_per_step"] == sync["syncs_per_step"]
    nlvr = json.loads((out / "nlvr2_step.json").read_text())  # the NLVR2 step, debug-sized here
    assert (nlvr["task"], nlvr["engine"], nlvr["batch_per_device"], nlvr["steps"]) == (
        "nlvr2",
        "deepspeed",
        4,
        2,
    )
    assert nlvr["samples_per_s"] > 0 and summary["nlvr2_step"]["samples_per_s"] == nlvr["samples_per_s"]
