"""Execution recipes for the side-by-side throughput benchmark.

"ours" is the production default (`PretrainOps()`); "reference" reruns the reference ALBEF implementation's
execution choices on the same model and the same math: a per-tensor EMA loop, hard negatives drawn row by
row with torch.multinomial (one host sync per row), the MLM vocabulary head over every one of the B x L
positions, and the unfused ITC. The model knows nothing of these: they are `PretrainOps` values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import kernels
from ..model.ops import PretrainOps

RECIPES = ("ours", "reference")


@torch.no_grad()
def ema_update_looped(moms: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], m: float) -> None:
    """The reference's EMA: one small kernel sequence per tensor (m_p <- m_p * m + p * (1 - m))."""
    for pm, p in zip(moms, onlines):
        pm.copy_(pm * m + p.detach().to(pm.dtype) * (1.0 - m))


def sample_hard_negatives_looped(sim: torch.Tensor) -> torch.Tensor:
    """The reference's way of drawing hard negatives: softmax, a small floor, the diagonal zeroed, then one
    torch.multinomial and one `.item()` (a host sync) per row. Same distribution as
    `albef_ds.model.losses.sample_hard_negatives` up to the floor. Returns LongTensor (B,)."""
    b = sim.shape[0]
    if b < 2:
        raise ValueError("hard-negative sampling needs a batch of at least 2")
    weights = F.softmax(sim.detach().float(), dim=1) + 1e-5
    weights.fill_diagonal_(0)
    picks = [int(torch.multinomial(weights[i], 1).item()) for i in range(b)]
    return torch.tensor(picks, dtype=torch.long, device=sim.device)


def reference_ops() -> PretrainOps:
    """The reference implementation's execution choices (see the module docstring)."""
    return PretrainOps(
        ema_update=ema_update_looped,
        itc_loss=kernels.itc_loss_reference,
        sample_hard_negatives=sample_hard_negatives_looped,
        mlm_head_positions="all",
        mlm_loss=kernels.mlm_loss_reference,
    )


def recipe_ops(recipe: str) -> PretrainOps:
    """The PretrainOps of a recipe name ("ours" or "reference")."""
    if recipe == "ours":
        return PretrainOps()
    if recipe == "reference":
        return reference_ops()
    raise ValueError(f"unknown recipe {recipe!r} (one of {', '.join(RECIPES)})")
