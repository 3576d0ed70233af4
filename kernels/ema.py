"""Fused momentum (EMA) update over every momentum tensor of the model: m_p <- m * m_p + (1 - m) * p.

Two implementations beside the per-tensor reference loop (`reference.ema_update_reference`):

* `ema_update_foreach`: torch's multi-tensor ops, `_foreach_mul_` then `_foreach_add_` (two passes over the
  momentum weights; one kernel launch per op and dtype group on CUDA). `_foreach_lerp_` would be one pass but
  refuses an fp32 target with bf16 sources.
* `ema_update_fused`: one Triton launch for every tensor (a table of addresses, one program per chunk of
  64k elements), a single pass: read m_p and p, write m_p (10 bytes per element from a bf16 model, against
  18 for the two foreach passes).

The momentum weights stay fp32 even when the online model trains in bf16 (DeepSpeed's bf16 mode casts
parameters, not our momentum buffers): with m = 0.995 each step moves m_p by 0.5% of (p - m_p), well
below bf16's 2^-8 relative spacing, so a bf16 EMA rounds most updates away and the momentum model freezes.
The online values are upcast to fp32 before the update.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .itc import require_runnable

__all__ = ["ema_update_foreach", "ema_update_fused"]

CHUNK = 65536
BLOCK = 1024


def _check_pairs(moms: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor]) -> None:
    if len(moms) != len(onlines):
        raise ValueError(f"EMA got {len(moms)} momentum and {len(onlines)} online tensors")
    for i, (pm, p) in enumerate(zip(moms, onlines)):
        if pm.shape != p.shape:
            raise ValueError(f"EMA pair {i}: momentum shape {tuple(pm.shape)} != online {tuple(p.shape)}")


@torch.no_grad()
def ema_update_foreach(moms: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], m: float) -> None:
    """Multi-tensor torch ops; bit-identical to the reference loop (same elementwise kernels)."""
    _check_pairs(moms, onlines)
    moms = list(moms)
    if not moms:
        return
    onlines = [p.detach() for p in onlines]
    torch._foreach_mul_(moms, m)
    # Accepts fp32 targets with bf16 sources (computed in fp32), unlike _foreach_lerp_.
    torch._foreach_add_(moms, onlines, alpha=1.0 - m)


_TL_DTYPES = ("float32", "bfloat16", "float16")


@functools.cache
def _kernel(interpret: bool):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from ._ema_triton import ema_multi_tensor_kernel

    return (InterpretedFunction if interpret else JITFunction)(ema_multi_tensor_kernel)


class _Plan:
    """Address table and chunk map of one list of tensors, rebuilt only when the tensors change."""

    def __init__(self, key, moms, onlines, device):
        numels = [pm.numel() for pm in moms]
        chunks_t, chunks_s = [], []
        for i, n in enumerate(numels):
            for s in range(0, n, CHUNK):
                chunks_t.append(i)
                chunks_s.append(s)
        self.key = key
        self.mom_addr = torch.tensor([pm.data_ptr() for pm in moms], dtype=torch.int64, device=device)
        self.onl_addr = torch.tensor([p.data_ptr() for p in onlines], dtype=torch.int64, device=device)
        self.numel = torch.tensor(numels, dtype=torch.int64, device=device)
        self.chunk_tensor = torch.tensor(chunks_t, dtype=torch.int32, device=device)
        self.chunk_start = torch.tensor(chunks_s, dtype=torch.int64, device=device)
        self.aligned = all(pm.data_ptr() % 16 == 0 and p.data_ptr() % 16 == 0 for pm, p in zip(moms, onlines))
        # The tables hold raw addresses: keep the tensors alive as long as the plan.
        self.tensors = (list(moms), list(onlines))


_plans: dict = {}


@torch.no_grad()
def ema_update_fused(moms: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], m: float) -> None:
    """One Triton launch per online dtype (one in practice) over every pair. Momentum tensors must be fp32
    and contiguous; runs on CUDA, or on CPU under TRITON_INTERPRET=1."""
    _check_pairs(moms, onlines)
    if not moms:
        return
    device = moms[0].device
    interpret = require_runnable(moms[0], "EMA")
    import triton.language as tl

    groups: dict[torch.dtype, tuple[list, list]] = {}
    for i, (pm, p) in enumerate(zip(moms, onlines)):
        if pm.dtype != torch.float32 or not pm.is_contiguous():
            raise ValueError(f"fused EMA: momentum tensor {i} must be contiguous fp32, got {pm.dtype}")
        if pm.device != device or p.device != device:
            raise ValueError(f"fused EMA: pair {i} is on {pm.device}/{p.device}, expected {device}")
        p = p.detach()
        if not p.is_contiguous():
            p = p.contiguous()  # a copy: fine, it is only read
        if str(p.dtype).removeprefix("torch.") not in _TL_DTYPES:
            raise ValueError(f"fused EMA: online tensor {i} has dtype {p.dtype}; expected fp32, bf16 or fp16")
        g = groups.setdefault(p.dtype, ([], []))
        g[0].append(pm)
        g[1].append(p)
    kernel = _kernel(interpret)
    for dtype, (gm, go) in groups.items():
        key = (dtype, tuple((a.data_ptr(), b.data_ptr(), a.numel()) for a, b in zip(gm, go)))
        plan = _plans.get(dtype)
        if plan is None or plan.key != key:
            plan = _plans[dtype] = _Plan(key, gm, go, device)
        n_chunks = plan.chunk_tensor.numel()
        extra = {} if interpret else {"num_warps": 4}
        kernel[(n_chunks,)](
            plan.mom_addr, plan.onl_addr, plan.numel, plan.chunk_tensor, plan.chunk_start,
            float(m), float(1.0 - m),
            ONLINE_DTYPE=getattr(tl, str(dtype).removeprefix("torch.")), CHUNK=CHUNK, BLOCK=BLOCK,
            ALIGNED=plan.aligned, **extra,
        )  # fmt: skip
