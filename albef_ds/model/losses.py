"""ALBEF's sampling and masking steps, vectorised and free of host-device syncs.

The loss arithmetic itself (ITC, MLM) lives in `albef_ds.kernels` (pure-torch references + fused kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_hard_negatives(sim: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row i of a (B, B) similarity matrix draw one column j != i with P(j) = softmax(sim[i])_j.

    The diagonal is set to -inf *before* the softmax (the reference zeroed it after, which is NaN under
    fp16), and all rows are drawn at once with the Gumbel-max trick: argmax_j(sim_ij + G_ij), G ~ Gumbel(0,1),
    is an exact sample from softmax(sim_i). One kernel, no per-sample loop, no `.item()`.
    Returns LongTensor (B,). Needs B >= 2.
    """
    b = sim.shape[0]
    if sim.dim() != 2 or sim.shape[1] != b:
        raise ValueError(f"sample_hard_negatives needs a square (B, B) matrix, got {tuple(sim.shape)}")
    if b < 2:
        raise ValueError("hard-negative sampling needs a batch of at least 2")
    logits = sim.detach().float().clone()
    logits.fill_diagonal_(float("-inf"))
    u = torch.rand(logits.shape, device=logits.device, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))
    return (logits + gumbel).argmax(dim=1)


def sample_hard_negatives_looped(sim: torch.Tensor) -> torch.Tensor:
    """The reference's way of drawing hard negatives, kept for the side-by-side benchmark only: softmax, a
    small floor, the diagonal zeroed, then one torch.multinomial and one `.item()` (a host sync) per row.
    Same distribution as `sample_hard_negatives` up to the floor. Returns LongTensor (B,)."""
    b = sim.shape[0]
    if b < 2:
        raise ValueError("hard-negative sampling needs a batch of at least 2")
    weights = F.softmax(sim.detach().float(), dim=1) + 1e-5
    weights.fill_diagonal_(0)
    picks = [int(torch.multinomial(weights[i], 1).item()) for i in range(b)]
    return torch.tensor(picks, dtype=torch.long, device=sim.device)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    pad_token_id: int,
    cls_token_id: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each maskable token is chosen with `probability`; of those 80% -> [MASK],
    10% -> a random token, 10% unchanged. PAD and CLS are never chosen.

    input_ids: (B, L). Returns (masked_ids (B, L), labels (B, L)) with labels = original id where chosen and
    -100 elsewhere. Runs on the ids' device.
    """
    dev = input_ids.device
    shape = input_ids.shape
    maskable = (input_ids != pad_token_id) & (input_ids != cls_token_id)
    chosen = (torch.rand(shape, device=dev, generator=generator) < probability) & maskable
    labels = input_ids.masked_fill(~chosen, -100)
    r = torch.rand(shape, device=dev, generator=generator)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(vocab_size, shape, device=dev, generator=generator, dtype=input_ids.dtype)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_capacity(num_tokens: int, probability: float) -> int:
    """A static upper bound on the masked positions of a batch of `num_tokens` tokens.

    Mean + 6 standard deviations of Binomial(num_tokens, p) plus 8, capped at num_tokens: the chance that a
    batch exceeds it is below 1e-9, and if one ever does, the positions past the cap are simply not scored.
    A static size keeps the MLM head's input shape fixed, so selecting the masked rows needs no host sync.
    """
    mean = num_tokens * probability
    std = math.sqrt(num_tokens * probability * (1.0 - probability))
    return min(num_tokens, int(math.ceil(mean + 6.0 * std)) + 8)


def select_scored_positions(labels: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the scored (label != -100) positions of a (B, L) label matrix, padded to `capacity`.

    Returns (index (capacity,), labels (capacity,)): padding slots point at position 0 and carry label -100,
    so losses ignore them. The first `capacity` scored positions in row-major order are kept. Built with a
    scatter instead of boolean indexing, so its shape never depends on data (no device->host sync).
    """
    flat = labels.reshape(-1)
    n = flat.numel()
    scored = flat != -100
    rank = torch.cumsum(scored.long(), 0) - 1  # slot of each scored position
    slot = torch.where(scored & (rank < capacity), rank, torch.full_like(rank, capacity))
    index = torch.zeros(capacity + 1, dtype=torch.long, device=flat.device)
    index.scatter_(0, slot, torch.arange(n, device=flat.device))  # slot `capacity` collects the rest
    slot_used = torch.zeros(capacity + 1, dtype=torch.bool, device=flat.device)
    slot_used.scatter_(0, slot, scored)
    index, slot_used = index[:capacity], slot_used[:capacity]
    index = index.masked_fill(~slot_used, 0)
    sel_labels = flat.index_select(0, index).masked_fill(~slot_used, -100)
    return index, sel_labels


def itm_loss(logits: torch.Tensor, batch_size: int) -> torch.Tensor:
    """2-way cross-entropy over [B positives; 2B negatives] ITM logits (3B, 2)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:batch_size] = 1
    return F.cross_entropy(logits.float(), labels)
