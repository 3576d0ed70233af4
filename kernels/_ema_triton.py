"""Triton multi-tensor EMA kernel (see `ema.py`). Imported only when Triton is installed."""

from __future__ import annotations

import triton.language as tl


def ema_multi_tensor_kernel(
    mom_addr_ptr,  # (T,) int64: address of each fp32 momentum tensor
    onl_addr_ptr,  # (T,) int64: address of each online tensor (dtype ONLINE_DTYPE)
    numel_ptr,  # (T,) int64
    chunk_tensor_ptr,  # (C,) int32: which tensor chunk c belongs to
    chunk_start_ptr,  # (C,) int64: its first element
    m,
    one_minus_m,
    ONLINE_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """m_p <- m * m_p + (1 - m) * p over CHUNK elements of one tensor; one program per chunk, so one launch
    covers every tensor however their sizes differ."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c)
    start = tl.multiple_of(tl.load(chunk_start_ptr + c), CHUNK)  # chunks start at multiples of CHUNK
    n = tl.load(numel_ptr + t)
    mom = tl.load(mom_addr_ptr + t).to(tl.pointer_type(tl.float32))
    onl = tl.load(onl_addr_ptr + t).to(tl.pointer_type(ONLINE_DTYPE))
    if ALIGNED:  # every address is 16-byte aligned (checked on the host): lets the compiler emit 16-byte
        # loads and stores (checked in the PTX for sm_90: ld.global.v4 / st.global.v4)
        mom = tl.multiple_of(mom, 16)
        onl = tl.multiple_of(onl, 16)
    todo = tl.minimum(n - start, CHUNK)  # the last chunk of a tensor (and a small tensor) stops early
    # Whole blocks without a mask (a mask against an arbitrary n blocks vector loads), then one masked tail.
    n_full = todo // BLOCK * BLOCK
    for off in range(0, n_full, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        a = tl.load(mom + idx)
        p = tl.load(onl + idx).to(tl.float32)
        # fma(p, 1 - m, m * a): the rounding of torch's `mul_(m).add_(p, alpha=1 - m)`, whose add kernel is
        # a fused multiply-add on CPU and (by nvcc contraction) on CUDA.
        tl.store(mom + idx, tl.fma(p, one_minus_m, a * m))
    if n_full < todo:
        idx = start + n_full + tl.arange(0, BLOCK)
        mask = idx < n
        a = tl.load(mom + idx, mask=mask)
        p = tl.load(onl + idx, mask=mask).to(tl.float32)
        tl.store(mom + idx, tl.fma(p, one_minus_m, a * m), mask=mask)
