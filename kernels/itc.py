"""Fused ITC loss: soft-target cross-entropy over [momentum batch; queue] without a B x (B+Q) matrix.

Math (one direction; rows f_i, momentum rows fm_i, bank rows b_j, j < N = B + Q, temperature T):

    s_ij = f_i . b_j / T        sm_ij = fm_i . b_j / T        (sm only shapes the targets: no gradient)
    y_ij = alpha * softmax(sm_i)_j + (1 - alpha) * [i == j]
    loss_i = -sum_j y_ij log softmax(s_i)_j = lse(s_i) - alpha * E_{softmax(sm_i)}[s_i] - (1 - alpha) * s_ii

since sum_j y_ij = 1. The forward kernel streams the bank in tiles and keeps, per row, an online
log-sum-exp of s and of sm and the momentum-weighted sum of s (three running numbers and two maxima).
With p = softmax(s), q = softmax(sm) and g_i the upstream gradient of loss_i:

    dL/df_i = g_i / T * (sum_j (p_ij - alpha q_ij) b_j - (1 - alpha) b_i)
    dL/dT   = -sum_i g_i / T * (sum_j (p_ij - alpha q_ij) s_ij - (1 - alpha) s_ii)

which the backward kernel gets in a second streaming pass that recomputes s and sm with the saved
log-sum-exps. Nothing of size B x N is ever written: the forward keeps 5 numbers per (row, bank split),
the backward S x B x D partial gradients (S bank splits, chosen to fill the GPU).

Gradients go to the online features and the temperature, exactly the inputs the reference differentiates in
the model (its banks are built under no_grad and its targets are computed under no_grad). The reference
would also differentiate a bank that requires grad (through s); the fused op does not, and refuses such
a bank with an error rather than silently dropping that gradient.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["FusedITCDirection", "fused_supported", "interpreter_active", "itc_loss_fused", "triton_available"]

# Bank tile: 64 rows per step when compiled; the interpreter pays per Triton op, not per element, so it
# takes 256-row tiles (same kernel code, fewer steps). Tests also run the compiled configuration.
BLOCK_N_GPU = 64
BLOCK_N_INTERPRET = 256


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter in this process.

    Triton decides once, when it is first imported: TRITON_INTERPRET=1 must be set by then (it also
    decorates its own library, tl.sum, tl.zeros, ..., for one mode or the other). Read from Triton's library
    itself, so that a variable set too late is not mistaken for an active interpreter."""
    if not triton_available():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def fused_supported(t: torch.Tensor) -> bool:
    """Can the Triton kernels run on this tensor: compiled on CUDA, or anywhere in Triton's interpreter."""
    return triton_available() and (interpreter_active() or t.is_cuda)


def require_runnable(t: torch.Tensor, what: str) -> bool:
    """Raise a clear error where the Triton kernels cannot run on `t`; else return whether to interpret."""
    if not triton_available():
        raise RuntimeError(
            f"the fused {what} needs Triton (pip install triton), or set ALBEF_KERNELS=reference"
        )
    if interpreter_active():
        return True
    if t.is_cuda:
        return False
    late = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    hint = (
        " TRITON_INTERPRET is set, but triton was imported before it was (set it before the first import)."
        if late
        else ""
    )
    raise RuntimeError(
        f"the fused {what} runs on CUDA tensors, or in Triton's interpreter (TRITON_INTERPRET=1 before "
        f"triton is imported); got a tensor on {t.device}.{hint} Use ALBEF_KERNELS=auto or reference on "
        "this device."
    )


@functools.cache
def _kernels(interpret: bool):
    """(forward, backward) kernels, decorated on first use for the mode Triton runs in."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from . import _itc_triton as k

    wrap = InterpretedFunction if interpret else JITFunction
    return wrap(k.itc_fwd_kernel), wrap(k.itc_bwd_kernel)


def blocks(b: int, d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) for B rows of D features."""
    block_d = max(16, triton_next_pow2(d))
    # Row block: tl.dot needs >= 16 on every side; 32 rows x 256 dims keeps f, fm, the bank tile and the
    # backward's accumulator in registers with 8 warps; wider features get 16 rows.
    block_m = 16 if (b <= 16 or block_d > 256) else 32
    return block_m, block_d


def default_block_n(block_d: int, interpret: bool) -> int:
    if interpret:
        return BLOCK_N_INTERPRET
    return BLOCK_N_GPU if block_d <= 256 else 32  # wide features: a smaller bank tile saves registers


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def split_plan(
    n_sms: int | None, row_blocks: int, n_tiles: int, splits: int | None, programs_per_sm: int
) -> tuple[int, int]:
    """(tiles per split, number of splits) of a bank of n_tiles tiles.

    Compiled: about `programs_per_sm` programs per SM (4 in the forward, whose per-split output is 5 numbers
    a row; 1 in the backward, whose per-split output is a (B, D) fp32 partial gradient: one wave keeps that
    workspace near SMs * BLOCK_M * D * 4 bytes, 4.3 MB on a 132-SM card at D = 256). Interpreted
    (n_sms None): 4 splits."""
    if splits is None:
        splits = 4 if n_sms is None else max(1, -(-programs_per_sm * n_sms // row_blocks))
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = -(-n_tiles // splits)
    return tiles_per_split, -(-n_tiles // tiles_per_split)  # no split starts past the end of the bank


def _n_sms(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _check(f, fm, bank, temp):
    if f.dim() != 2 or fm.shape != f.shape:
        raise ValueError(
            f"ITC features must be (B, D) with matching momentum features, got {f.shape}, {fm.shape}"
        )
    if bank.dim() != 2 or bank.shape[1] != f.shape[1] or bank.shape[0] < f.shape[0]:
        raise ValueError(
            f"ITC bank must be (B + Q, D) = (>= {f.shape[0]}, {f.shape[1]}), got {tuple(bank.shape)}"
        )
    if temp.numel() != 1:
        raise ValueError(f"ITC temperature must have one element, got shape {tuple(temp.shape)}")


def _direction_forward(f, fm, bank, temp32, splits, block_n):
    """Per-row (lse_s, lse_q, E_q[s]) of one direction, each (B,) fp32."""
    b, d = f.shape
    n = bank.shape[0]
    block_m, block_d = blocks(b, d)
    row_blocks = -(-b // block_m)
    interpret = require_runnable(f, "ITC loss")
    block_n = block_n or default_block_n(block_d, interpret)
    tps, n_splits = split_plan(_n_sms(f.device), row_blocks, -(-n // block_n), splits, 4)
    part = torch.empty(5, n_splits, b, device=f.device, dtype=torch.float32)
    fwd, _ = _kernels(interpret)
    extra = {} if interpret else {"num_warps": 8 if block_m * block_d >= 32 * 256 else 4}
    fwd[(row_blocks, n_splits)](
        f, fm, bank, temp32, part, b, n, d, f.stride(0), fm.stride(0), bank.stride(0), tps, n_splits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **extra,
    )  # fmt: skip
    m_s, l_s, m_q, l_q, a_q = part.unbind(0)  # each (S, B)
    ms = m_s.max(0).values
    lse_s = ms + torch.log((l_s * torch.exp(m_s - ms)).sum(0))
    mq = m_q.max(0).values
    wq = torch.exp(m_q - mq)
    lq = (l_q * wq).sum(0)
    lse_q = mq + torch.log(lq)
    e_q_s = (a_q * wq).sum(0) / lq
    return lse_s, lse_q, e_q_s


def _direction_backward(f, fm, bank, temp32, lse, alpha, splits, block_n):
    """(sum_j (p - alpha q)_ij b_j: (B, D), sum_j (p - alpha q)_ij s_ij: (B,)), fp32."""
    b, d = f.shape
    n = bank.shape[0]
    block_m, block_d = blocks(b, d)
    row_blocks = -(-b // block_m)
    interpret = require_runnable(f, "ITC loss")
    block_n = block_n or default_block_n(block_d, interpret)
    tps, n_splits = split_plan(_n_sms(f.device), row_blocks, -(-n // block_n), splits, 1)
    gpart = torch.empty(n_splits, b, d, device=f.device, dtype=torch.float32)
    rpart = torch.empty(n_splits, b, device=f.device, dtype=torch.float32)
    _, bwd = _kernels(interpret)
    extra = {} if interpret else {"num_warps": 8 if block_m * block_d >= 32 * 256 else 4}
    bwd[(row_blocks, n_splits)](
        f, fm, bank, temp32, lse, gpart, rpart, float(alpha), b, n, d, f.stride(0), fm.stride(0),
        bank.stride(0), tps, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **extra,
    )  # fmt: skip
    return gpart.sum(0), rpart.sum(0)


def _diag(f, bank, temp32):
    """s_ii = f_i . b_i / T, (B,) fp32 (B dot products: not worth a kernel)."""
    b = f.shape[0]
    return (f.float() * bank[:b].float()).sum(-1) / temp32


class FusedITCDirection(torch.autograd.Function):
    """mean_i loss_i of one direction; differentiable in f and temp only."""

    @staticmethod
    def forward(ctx, f, fm, bank, temp, alpha: float, splits: int | None = None, block_n: int | None = None):
        f, fm, bank = f.contiguous(), fm.contiguous(), bank.contiguous()
        temp32 = temp.detach().float().reshape(1).contiguous()
        lse_s, lse_q, e_q_s = _direction_forward(f, fm, bank, temp32, splits, block_n)
        s_ii = _diag(f, bank, temp32)
        loss = (lse_s - alpha * e_q_s - (1.0 - alpha) * s_ii).mean()
        ctx.save_for_backward(f, fm, bank, temp, torch.stack([lse_s, lse_q]), s_ii)
        ctx.alpha, ctx.splits, ctx.block_n = alpha, splits, block_n
        return loss

    @staticmethod
    def backward(ctx, g):
        f, fm, bank, temp, lse, s_ii = ctx.saved_tensors
        alpha = ctx.alpha
        temp32 = temp.detach().float().reshape(1).contiguous()
        b = f.shape[0]
        gw, r = _direction_backward(f, fm, bank, temp32, lse.contiguous(), alpha, ctx.splits, ctx.block_n)
        scale = g.float() / b  # d mean / d loss_i
        grad_f = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_f = (scale / temp32) * (gw - (1.0 - alpha) * bank[:b].float())
            grad_f = grad_f.to(f.dtype)
        if ctx.needs_input_grad[3]:
            grad_t = -(scale / temp32) * (r - (1.0 - alpha) * s_ii).sum()
            grad_t = grad_t.reshape(temp.shape).to(temp.dtype)
        return grad_f, None, None, grad_t, None, None, None


def itc_loss_fused(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_bank: torch.Tensor,
    text_bank: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    *,
    splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The fused counterpart of `itc_loss_reference` (same arguments, same fp32 scalar result).

    splits: bank chunks per row block (default: fill the GPU; 4 on the interpreter); block_n: bank rows per
    tile, a power of two >= 16 (default 64 compiled, 256 interpreted). Tests vary both.
    """
    for name, bank in (("image_bank", image_bank), ("text_bank", text_bank)):
        if bank.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"itc_loss_fused: {name} requires grad; the fused loss differentiates the online features "
                "and the temperature only (the model builds its banks under no_grad). Use itc_loss_reference."
            )
    _check(image_feat, image_feat_m, text_bank, temp)
    _check(text_feat, text_feat_m, image_bank, temp)
    loss_i2t = FusedITCDirection.apply(
        image_feat, image_feat_m, text_bank, temp, float(alpha), splits, block_n
    )
    loss_t2i = FusedITCDirection.apply(
        text_feat, text_feat_m, image_bank, temp, float(alpha), splits, block_n
    )
    return (loss_i2t + loss_t2i) / 2
