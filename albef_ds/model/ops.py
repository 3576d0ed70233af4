"""Execution choices of a pre-training step that do not change its math: which EMA update, which ITC loss,
which hard-negative sampler, where the MLM vocabulary head runs and which MLM loss scores it. The defaults
are ours (fused where the kernels allow it, vectorised, masked positions only); a benchmark swaps in other
choices (`albef_ds.bench.recipes.reference_ops`) without the model knowing about benchmarks.

`Sections` is the optional timing hook: a callable name -> context manager, entered around the parts of a
forward (`SECTION_NAMES`); None runs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .. import kernels
from .losses import sample_hard_negatives
from .momentum import EmaUpdate

# (image_feat, text_feat, image_feat_m, text_feat_m, image_bank, text_bank, temp, alpha) -> scalar loss
ItcLoss = Callable[..., torch.Tensor]
# (logits (K, V), labels (K,), momentum probabilities (K, V), alpha) -> scalar loss
MlmLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
Sections = Callable[[str], contextlib.AbstractContextManager]

# The parts of ALBEFPretrain.forward a `sections` hook is entered around, in order.
SECTION_NAMES: Sequence[str] = ("online_forward", "momentum_forward", "itc", "itm", "mlm")


@dataclass(frozen=True)
class PretrainOps:
    """The swappable pieces of a pre-training step (all compute the same losses up to rounding).

    ema_update: (momentum tensors, online tensors, m) -> None, in place;
    itc_loss: ITC with momentum distillation over [batch; queue], both directions;
    sample_hard_negatives: (B, B) similarities -> (B,) negative indices (never the diagonal);
    mlm_head_positions: "masked" runs the vocabulary head on the masked positions only (a static capacity,
        no host sync), "all" on every one of the B x L positions;
    mlm_loss: soft-target MLM loss over the scored rows (label -100 ignored).
    """

    ema_update: EmaUpdate = kernels.ema_update
    itc_loss: ItcLoss = kernels.itc_loss
    sample_hard_negatives: Callable[[torch.Tensor], torch.Tensor] = sample_hard_negatives
    mlm_head_positions: Literal["masked", "all"] = "masked"
    mlm_loss: MlmLoss = kernels.mlm_loss

    def __post_init__(self) -> None:
        if self.mlm_head_positions not in ("masked", "all"):
            raise ValueError(f"mlm_head_positions must be 'masked' or 'all', got {self.mlm_head_positions!r}")


def no_sections(name: str) -> contextlib.AbstractContextManager:
    """The default `sections` hook: nothing around any part."""
    return contextlib.nullcontext()
