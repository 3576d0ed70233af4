"""Kernels and their references, with one dispatch point.

`itc_loss` and `ema_update` pick an implementation per call from `ALBEF_KERNELS` (read at every call):

* `auto` (default): the fused Triton kernels for CUDA tensors when Triton is installed, the pure-torch
  references otherwise (CPU tensors, or no Triton).
* `fused`: the Triton kernels, compiled on CUDA; on CPU only under `TRITON_INTERPRET=1` (Triton's
  interpreter, for tests). Elsewhere asking for `fused` is an error naming the device and the fix, rather
  than a silent fallback: whoever sets it wants to know the fused path is what ran.
* `reference`: the pure-torch references in `reference.py`.

Both implementations are always importable: Triton is imported only when a fused kernel first runs.
`mlm_loss` has no fused kernel yet and always resolves to its reference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .ema import ema_update_foreach, ema_update_fused
from .itc import fused_supported, itc_loss_fused, triton_available
from .reference import ema_update_reference, itc_loss_reference, mlm_loss_reference, soft_cross_entropy

_MODES = ("auto", "fused", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("ALBEF_KERNELS", "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"ALBEF_KERNELS must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def use_fused(t: torch.Tensor) -> bool:
    """Whether an op on tensors like `t` runs fused under the current ALBEF_KERNELS."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "fused":
        return True  # the fused op raises a clear error where it cannot run
    return t.is_cuda and triton_available()


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_bank: torch.Tensor,
    text_bank: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """ITC loss with momentum distillation; see `itc_loss_reference` for the definition."""
    impl = itc_loss_fused if use_fused(image_feat) else itc_loss_reference
    return impl(image_feat, text_feat, image_feat_m, text_feat_m, image_bank, text_bank, temp, alpha)


def ema_update(moms: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], m: float) -> None:
    """m_p <- m * m_p + (1 - m) * p for every pair (in place, no grad)."""
    if moms and use_fused(moms[0]):
        ema_update_fused(moms, onlines, m)
    else:
        ema_update_reference(moms, onlines, m)


mlm_loss = mlm_loss_reference

__all__ = [
    "ema_update",
    "ema_update_foreach",
    "ema_update_fused",
    "ema_update_reference",
    "fused_supported",
    "itc_loss",
    "itc_loss_fused",
    "itc_loss_reference",
    "kernel_mode",
    "mlm_loss",
    "mlm_loss_reference",
    "soft_cross_entropy",
    "use_fused",
]
