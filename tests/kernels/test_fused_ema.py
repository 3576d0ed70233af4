"""The multi-tensor EMA (Triton, and torch's _foreach ops) against `ema_update_reference`, and why the
momentum weights stay fp32.

The Triton kernel runs in Triton's interpreter on CPU (see test_fused_itc.py for how the interpreter is
switched on, and for the fresh-process fallback when triton was imported compiled) and compiled under the
`gpu` marker. The interpreter evaluates tl.fma as a multiply then an add (two roundings), while torch's add
kernel, which the reference uses, is a true fused multiply-add on CPU: interpreted, the kernel is therefore
checked bit for bit against the two-rounding formula and to within one ulp of the reference; compiled (a
hardware fma), bit for bit against the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton

from albef_ds.kernels import ema_update_foreach, ema_update_fused, ema_update_reference  # noqa: E402
from albef_ds.kernels.ema import CHUNK  # noqa: E402
from albef_ds.kernels.itc import interpreter_active, triton_available  # noqa: E402

from albef_ds import kernels  # noqa: E402

INTERPRETING = interpreter_active()
SKIP_REASON = (
    "Triton's interpreter is off in this process; test_interpreted_cases_in_a_fresh_process runs these"
)
needs_interpreter = pytest.mark.skipif(not (triton_available() and INTERPRETING), reason=SKIP_REASON)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[2]
M = 0.995
# Chunk edges (CHUNK elements per program), a 0-element tensor, odd shapes.
SHAPES = [(CHUNK,), (CHUNK + 1,), (3, 5), (0,), (2 * CHUNK + 7,), (1,), (30, 77)]


def _pairs(online_dtype, device="cpu", shapes=SHAPES):
    moms = [torch.randn(s, device=device) for s in shapes]
    onlines = [torch.randn(s, device=device).to(online_dtype) for s in shapes]
    return moms, onlines


def _roundings_apart(a: torch.Tensor, b: torch.Tensor, size: torch.Tensor) -> float:
    """|a - b| in fp32 roundings of terms of magnitude `size` (the EMA's m * m_p and (1 - m) * p: where they
    nearly cancel, one rounding of theirs is many ulps of the small result)."""
    if a.numel() == 0:
        return 0.0
    eps = torch.finfo(torch.float32).eps
    return ((a.double() - b.double()).abs() / (eps * size.double() + 1e-45)).max().item()


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available() or not triton_available(), reason="not needed")
def test_interpreted_cases_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-rs", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, out
    assert SKIP_REASON not in r.stdout, out


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16])
def test_foreach_equals_reference_bit_for_bit(online_dtype):
    moms, onlines = _pairs(online_dtype)
    want = [t.clone() for t in moms]
    for _ in range(5):
        ema_update_reference(want, onlines, M)
        ema_update_foreach(moms, onlines, M)
    for a, b in zip(moms, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@needs_interpreter
@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_interpreted_matches_reference(online_dtype):
    moms, onlines = _pairs(online_dtype)
    ref = [t.clone() for t in moms]
    two_roundings = [t.clone() for t in moms]
    m32, a32 = torch.tensor(M, dtype=torch.float32), torch.tensor(1.0 - M, dtype=torch.float32)
    for _ in range(3):
        ema_update_fused(moms, onlines, M)
        ema_update_reference(ref, onlines, M)
        for t, p in zip(two_roundings, onlines):
            t.copy_(t * m32 + p.float() * a32)
    for got, want, exact, p in zip(moms, ref, two_roundings, onlines):
        assert torch.equal(got, exact)  # every element of every chunk updated, none twice
        size = got.abs() + p.float().abs()
        assert _roundings_apart(got, want, size) <= 3  # at most one rounding per step apart


@needs_interpreter
def test_fused_one_launch_for_mixed_sizes_and_non_contiguous_online():
    base = torch.randn(40, 30)
    online = [base.t(), torch.randn(7)]  # a transposed (non-contiguous) online tensor is read via a copy
    moms = [torch.randn(30, 40), torch.randn(7)]
    ref = [t.clone() for t in moms]
    ema_update_fused(moms, online, M)
    ema_update_reference(ref, online, M)
    for a, b, p in zip(moms, ref, online):
        assert _roundings_apart(a, b, a.abs() + p.abs()) <= 1


def test_fused_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 momentum and 1 online"):
        ema_update_fused([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], M)
    with pytest.raises(ValueError, match="momentum shape"):
        ema_update_foreach([torch.zeros(2)], [torch.zeros(3)], M)
    if INTERPRETING:
        with pytest.raises(ValueError, match="contiguous fp32"):
            ema_update_fused([torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)], M)


def test_fp32_momentum_from_bf16_online_tracks_float64_where_bf16_momentum_stalls():
    """100 steps of m = 0.995 from a bf16 online model that drifts each step: the fp32 EMA (what every
    implementation here does) follows an exact float64 EMA; a bf16 EMA leaves many elements where they
    were."""
    n, steps = 4096, 100
    online = torch.randn(n).bfloat16()
    mom32 = online.float().clone()
    mom64 = online.double().clone()
    mom16 = online.clone()
    changed16 = torch.zeros(n, dtype=torch.bool)
    start16 = mom16.clone()
    for _ in range(steps):
        online = (online.float() + 0.01 * torch.randn(n)).bfloat16()
        ema_update_foreach([mom32], [online], M)
        mom64.mul_(M).add_(online.double(), alpha=1 - M)
        mom16.mul_(M).add_(online, alpha=1 - M)  # what a bf16 momentum copy would do
        changed16 |= mom16 != start16
    err32 = (mom32.double() - mom64).abs().max().item()
    err16 = (mom16.double() - mom64).abs().max().item()
    moved64 = (mom64 - start16.double()).abs()
    eps32 = torch.finfo(torch.float32).eps
    assert err32 <= steps * eps32 * mom64.abs().max().item()  # at most a rounding per step
    assert err32 < 1e-3 * moved64.max().item()
    assert err16 > 100 * err32
    # The float64 EMA moved every element; the bf16 one left a large share untouched.
    assert (moved64 > 0).all()
    assert changed16.float().mean().item() < 0.7


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("ALBEF_KERNELS", "auto")
    moms, onlines = _pairs(torch.bfloat16)
    want = [t.clone() for t in moms]
    kernels.ema_update(moms, onlines, M)
    ema_update_reference(want, onlines, M)
    assert all(torch.equal(a, b) for a, b in zip(moms, want))


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_compiled_equals_reference_bit_for_bit_gpu(online_dtype):
    moms, onlines = _pairs(online_dtype, "cuda")
    ref = [t.clone() for t in moms]
    fe = [t.clone() for t in moms]
    for _ in range(3):
        ema_update_fused(moms, onlines, M)
        ema_update_reference(ref, onlines, M)
        ema_update_foreach(fe, onlines, M)
    for a, b, c in zip(moms, ref, fe):
        assert torch.equal(a, b) and torch.equal(c, b)
