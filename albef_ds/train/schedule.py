"""Step-level learning-rate and alpha schedules, and AdamW parameter groups."""

from __future__ import annotations

import math

from torch import nn


def lr_at(
    step: int, *, total_steps: int, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int
) -> float:
    """Linear warm-up from warmup_lr to lr over warmup_steps, then cosine decay to min_lr at total_steps.

    Step-level (the reference warms up in a staircase and decays per epoch)."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def alpha_at(step: int, *, alpha: float, ramp_steps: int) -> float:
    """alpha ramps linearly from 0 to `alpha` over ramp_steps (ALBEF: the first epoch), then stays."""
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, step / ramp_steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on biases, norms, embeddings' 1-D params, temp."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
