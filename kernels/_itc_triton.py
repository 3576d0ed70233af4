"""Triton kernels of the fused ITC loss (see `itc.py` for the math and the autograd wrapper).

Imported only when Triton is installed. The kernels are plain Python functions here; `itc.py` wraps each in
`triton.jit` (compiled, CUDA tensors) or in Triton's interpreter (CPU tensors under TRITON_INTERPRET=1).

Both kernels see one direction: rows f (B, D), fm (B, D) against a bank (N, D), N = B + Q. The grid is
(row blocks, bank splits): B is small (32-256) while N is 65k, so the parallelism comes from splitting the
bank into contiguous chunks (split-K, like flash-decoding); each program streams its chunk in BLOCK_N tiles
and writes per-row partial results that `itc.py` merges in torch (O(splits * B) numbers, or
O(splits * B * D) for the gradient). All arithmetic is fp32: inputs of any float dtype are upcast on load
(the interpreter has no bf16 arithmetic, and bf16 x bf16 products are exact in fp32 anyway), and tl.dot
runs with input_precision="ieee" so that fp32 inputs are not rounded to tf32.
"""

from __future__ import annotations

import triton.language as tl


def itc_fwd_kernel(
    f_ptr,  # (B, D) online features
    fm_ptr,  # (B, D) momentum features
    bank_ptr,  # (N, D) candidates
    temp_ptr,  # (1,) temperature
    part_ptr,  # (5, S, B) fp32 out: m_s, l_s, m_q, l_q, a_q per split and row
    B,
    N,
    D,
    stride_f,
    stride_fm,
    stride_bank,
    tiles_per_split,
    n_splits,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online log-sum-exp of s = f.bank/T and of s_m = fm.bank/T over one bank chunk, plus
    a_q = sum_j exp(s_m - m_q) * s_j (the momentum-weighted sum of s, rescaled with m_q as it moves)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    dim_ok = dims < D
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)

    fmask = row_ok[:, None] & dim_ok[None, :]
    f = tl.load(f_ptr + rows[:, None] * stride_f + dims[None, :], mask=fmask, other=0.0).to(tl.float32)
    fm = tl.load(fm_ptr + rows[:, None] * stride_fm + dims[None, :], mask=fmask, other=0.0).to(tl.float32)

    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    m_q = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_q = tl.zeros((BLOCK_M,), tl.float32)
    a_q = tl.zeros((BLOCK_M,), tl.float32)

    col0 = pid_s * tiles_per_split * BLOCK_N
    for t in range(0, tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        bank = tl.load(
            bank_ptr + cols[:, None] * stride_bank + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(f, tl.trans(bank), input_precision="ieee") * inv_t  # (BLOCK_M, BLOCK_N)
        sm = tl.dot(fm, tl.trans(bank), input_precision="ieee") * inv_t
        s_lse = tl.where(col_ok[None, :], s, float("-inf"))
        sm_lse = tl.where(col_ok[None, :], sm, float("-inf"))
        s_val = tl.where(col_ok[None, :], s, 0.0)  # finite stand-in: 0 * (-inf) would be NaN

        m_s_new = tl.maximum(m_s, tl.max(s_lse, axis=1))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s_lse - m_s_new[:, None]), axis=1)
        m_s = m_s_new

        m_q_new = tl.maximum(m_q, tl.max(sm_lse, axis=1))
        corr = tl.exp(m_q - m_q_new)
        e_q = tl.exp(sm_lse - m_q_new[:, None])
        l_q = l_q * corr + tl.sum(e_q, axis=1)
        a_q = a_q * corr + tl.sum(e_q * s_val, axis=1)
        m_q = m_q_new

    # A chunk may start past the end of the bank only if the host mis-sized the grid; its -inf maxima
    # then carry l = 0 and drop out of the merge.
    SB = n_splits * B
    out = part_ptr + pid_s * B + rows
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + SB, l_s, mask=row_ok)
    tl.store(out + 2 * SB, m_q, mask=row_ok)
    tl.store(out + 3 * SB, l_q, mask=row_ok)
    tl.store(out + 4 * SB, a_q, mask=row_ok)


def itc_bwd_kernel(
    f_ptr,
    fm_ptr,
    bank_ptr,
    temp_ptr,
    lse_ptr,  # (2, B) fp32: lse of s, lse of s_m
    gpart_ptr,  # (S, B, D) fp32 out: sum_j (p - alpha q)_ij bank_j over the chunk
    rpart_ptr,  # (S, B) fp32 out: sum_j (p - alpha q)_ij s_ij over the chunk
    alpha,
    B,
    N,
    D,
    stride_f,
    stride_fm,
    stride_bank,
    tiles_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Recompute s and s_m tile by tile with the final log-sum-exps, and accumulate
    w = softmax(s) - alpha * softmax(s_m) against the bank (the gradient direction of f, before the
    one-hot term and the 1/T factor) and against s (for d/dT)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    dim_ok = dims < D
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)

    fmask = row_ok[:, None] & dim_ok[None, :]
    f = tl.load(f_ptr + rows[:, None] * stride_f + dims[None, :], mask=fmask, other=0.0).to(tl.float32)
    fm = tl.load(fm_ptr + rows[:, None] * stride_fm + dims[None, :], mask=fmask, other=0.0).to(tl.float32)
    lse_s = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    lse_q = tl.load(lse_ptr + B + rows, mask=row_ok, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    r = tl.zeros((BLOCK_M,), tl.float32)
    col0 = pid_s * tiles_per_split * BLOCK_N
    for t in range(0, tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        bank = tl.load(
            bank_ptr + cols[:, None] * stride_bank + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(f, tl.trans(bank), input_precision="ieee") * inv_t
        sm = tl.dot(fm, tl.trans(bank), input_precision="ieee") * inv_t
        p = tl.exp(s - lse_s[:, None])
        q = tl.exp(sm - lse_q[:, None])
        w = tl.where(col_ok[None, :] & row_ok[:, None], p - alpha * q, 0.0)
        acc += tl.dot(w, bank, input_precision="ieee")
        r += tl.sum(w * s, axis=1)

    g_out = gpart_ptr + (pid_s * B + rows[:, None]) * D + dims[None, :]
    tl.store(g_out, acc, mask=fmask)
    tl.store(rpart_ptr + pid_s * B + rows, r, mask=row_ok)
