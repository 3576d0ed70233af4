"""The DeepSpeed 0.19.8 pitfalls listed in ARCHITECTURE.md, each checked on real ranks so it fails if it
comes back. Two CPU ranks (`deepspeed --num_gpus 2`, gloo) run tests/train/ds_pitfalls_worker.py in fp32 and
in bf16; ranks deliberately start from different weights, momentum copies and queues.

1. 0-dim temperature crashes deepspeed.initialize  -> temp has shape [1]; no 0-dim parameter; init works
2. bf16 casts parameters but not buffers            -> a bf16 run trains with fp32 queues and momentum
3. a bf16 EMA with m = 0.995 barely moves           -> momentum stays fp32 and equals a float64 EMA
4. DeepSpeed broadcasts parameters, never buffers   -> our engine broadcasts buffers: identical on ranks
5. universal checkpoints skip buffers               -> test_deepspeed_resume.py (universal resume test)
6. gradient_clipping defaults to 1.0                -> the live engine clips at optim.grad_clip (0 here)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("pitfalls")
    exe = Path(sys.executable).with_name("deepspeed")
    cmd = [
        str(exe),
        "--num_gpus",
        "2",
        "--no_local_rank",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests/train/ds_pitfalls_worker.py"),
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {
        p: [json.loads((out / f"{p}_rank{r}.json").read_text()) for r in (0, 1)] for p in ("fp32", "bf16")
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_1_temperature_is_not_zero_dim(reports, precision):
    for r in reports[precision]:
        assert r["temp_shape"] == [1] and r["zero_dim_params"] == []


def test_2_bf16_trains_with_fp32_buffers(reports):
    for r in reports["bf16"]:
        assert r["param_dtypes"] == ["torch.bfloat16"]  # DeepSpeed cast the trainable weights
        assert r["buffer_dtypes"] == ["torch.float32"]  # momentum encoders and queues were left alone
        assert r["queue_dtype"] == "torch.float32"
        assert all(math.isfinite(x) for x in r["losses"])  # bf16 features went into the fp32 queue


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_3_momentum_is_an_fp32_ema(reports, precision):
    for r in reports[precision]:
        assert r["momentum_dtypes"] == ["torch.float32"]
        # A bf16 EMA would be off by about 1e-3 (bf16 keeps 8 bits); fp32 stays at rounding level.
        assert r["ema_max_abs_err"] < 1e-6, r["ema_max_abs_err"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_4_ranks_start_and_stay_identical(reports, precision):
    a, b = reports[precision]
    assert a["params_sha_at_init"] == b["params_sha_at_init"]  # DeepSpeed broadcast the parameters
    assert a["buffers_sha_at_init"] == b["buffers_sha_at_init"]  # we broadcast the buffers
    assert a["buffers_sha_after"] == b["buffers_sha_after"]  # EMA + one all-gather per step keep them equal
    assert a["params_sha_after"] == b["params_sha_after"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_6_gradient_clipping_is_what_the_config_says(reports, precision):
    for r in reports[precision]:
        assert r["gradient_clipping"] == 0.0  # optim.grad_clip = 0 (the reference does not clip)
