"""Kernels and their references, with one dispatch point.

`ALBEF_KERNELS=reference` forces the pure-torch references; `fused` asks for the Triton kernels, which the
fused-kernels issue adds (until then every op resolves to its reference, and asking for `fused` says so
once in the log).
"""

from __future__ import annotations

import logging
import os

from .reference import ema_update_reference, itc_loss_reference, mlm_loss_reference, soft_cross_entropy

log = logging.getLogger(__name__)

_MODES = ("auto", "fused", "reference")


def kernel_mode() -> str:
    mode = os.environ.get("ALBEF_KERNELS", "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"ALBEF_KERNELS must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


if kernel_mode() == "fused":
    log.warning("ALBEF_KERNELS=fused: no fused kernel is built yet; using the pure-torch references")

# The dispatch table: today every entry is the reference.
itc_loss = itc_loss_reference
mlm_loss = mlm_loss_reference
ema_update = ema_update_reference

__all__ = [
    "ema_update",
    "ema_update_reference",
    "itc_loss",
    "itc_loss_reference",
    "kernel_mode",
    "mlm_loss",
    "mlm_loss_reference",
    "soft_cross_entropy",
]
