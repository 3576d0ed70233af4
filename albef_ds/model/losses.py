"""ALBEF's sampling and masking steps, vectorised and free of host-device syncs.

The loss arithmetic itself (ITC, MLM) lives in `albef_ds.kernels` (pure-torch references + fused kernels);
here are the pieces every task shares: hard-negative sampling (Gumbel-max), the ITM block over 3B pairs,
the retrieval ITC with same-id positives, MLM masking and the static selection of scored positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


def _gumbel_argmax(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One exact draw per row from softmax(logits): argmax_j(logits_ij + G_ij), G ~ Gumbel(0, 1). Columns at
    -inf are never drawn. One kernel, no per-sample loop, no `.item()`. (R, C) fp32 -> LongTensor (R,)."""
    u = torch.rand(logits.shape, device=logits.device, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))
    return (logits + gumbel).argmax(dim=1)


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
    return _gumbel_argmax(logits, generator)


def sample_negatives_excluding(
    sim: torch.Tensor, same: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i of a (B, B) similarity matrix draw a column j with same[i, j] False, with probability
    softmax over the allowed columns (Gumbel-max: argmax(sim + Gumbel noise) with the excluded columns at
    -inf; one kernel, no host sync). Returns (LongTensor (B,), valid (B,) bool): rows whose every column is
    excluded have no negative (valid False; their drawn index is meaningless)."""
    logits = sim.detach().float().masked_fill(same, float("-inf"))
    return _gumbel_argmax(logits, generator), ~same.all(dim=1)


Sampler = Callable[[torch.Tensor], Any]  # (B, B) similarities -> drawn columns (and whatever else it returns)


@torch.no_grad()
def draw_hard_negatives(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    temp: torch.Tensor,
    sample: Sampler = sample_hard_negatives,
) -> tuple[Any, Any]:
    """ALBEF's in-batch hard negatives for ITM: the sampling weights are the softmax of the in-batch ITC
    similarities (online query features against the other modality's momentum features, fp32).

    image_feat, text_feat: (B, D) online unit features; *_m: (B, D) momentum ones; temp: the (clamped)
    temperature. Returns (sample(sim_t2i): a negative image for each text, sample(sim_i2t): a negative
    text for each image), drawn in that order (so a fixed seed gives the same draws everywhere).
    """
    t = temp.detach().float()
    sim_i2t = image_feat.detach().float() @ text_feat_m.float().t() / t  # (B, B)
    sim_t2i = text_feat.detach().float() @ image_feat_m.float().t() / t
    return sample(sim_t2i), sample(sim_i2t)


def itm_pair_logits(
    fuse: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    itm_head: nn.Module,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    image_embeds: torch.Tensor,
    neg_image: torch.Tensor,
    neg_text: torch.Tensor,
) -> torch.Tensor:
    """ITM logits of 3B pairs in one fusion pass: [positives; (text, negative image); (negative text, image)].

    fuse: (text states (N, L, H), mask (N, L), image tokens (N, 1+P, W)) -> fused states (N, L, H) (the
    fusion encoder, `text_encoder.bert.fuse`); text_embeds (B, L, H), attention_mask (B, L), image_embeds
    (B, 1+P, W); neg_image / neg_text: (B,) indices into the batch. Returns (3B, 2) from the [CLS] state.
    """
    text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], dim=0)
    mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]], dim=0)
    image_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)
    return itm_head(fuse(text_all, mask_all, image_all)[:, 0])


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


def itc_loss_multi_positive(
    feat: torch.Tensor,
    feat_m: torch.Tensor,
    bank: torch.Tensor,
    pos: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """One direction of the retrieval ITC loss.

    feat, feat_m: (B, D) online / momentum unit features of the queries; bank: (B + Q, D) candidates
    ([momentum batch; queue] of the other modality); pos: (B, B + Q) bool, True where a candidate has the
    query's image id (each row has at least its own pair). Targets:
        y = alpha * softmax(feat_m @ bank^T / temp) + (1 - alpha) * pos / pos.sum(1)
    Loss = mean over rows of -sum(y * log_softmax(feat @ bank^T / temp)). Computed in fp32.
    """
    t = temp.float().reshape(())
    bank = bank.float()
    sim = feat.float() @ bank.t() / t  # (B, B+Q)
    with torch.no_grad():
        hard = pos.float() / pos.float().sum(dim=1, keepdim=True)
        targets = alpha * F.softmax(feat_m.float() @ bank.t() / t, dim=1) + (1.0 - alpha) * hard
    return kernels.soft_cross_entropy(sim, targets).mean()


def distill_ce(
    logits: torch.Tensor, logits_m: torch.Tensor | None, labels: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Classification with momentum distillation (NLVR2, SNLI-VE):
    (1 - alpha) CE(z, y) + alpha mean_b[-sum_c softmax(z_m)_c log_softmax(z)_c]; logits (B, C), labels (B,).
    Without a teacher (or alpha 0) the plain cross-entropy."""
    ce = F.cross_entropy(logits.float(), labels)
    if logits_m is None or alpha <= 0:
        return ce
    soft = F.softmax(logits_m.float(), dim=-1)
    kl = -(soft * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return (1.0 - alpha) * ce + alpha * kl


TA_TEMP = 0.07  # default temperature of text assignment's partner draw (fixed, not the learned one)


@torch.no_grad()
def text_assignment(
    image_feat: torch.Tensor, generator: torch.Generator | None = None, temp: float = TA_TEMP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLVR2's text-assignment draw for B captions with unit image features (B, D) of their own images.

    Partners of image i are drawn from softmax(f_i . f_j / temp) over j != i (diagonal at -inf before the
    softmax; temp = 0 draws them uniformly over j != i); two draws without replacement by Gumbel top-2, so
    the two partners differ. With p = 2/3 the pair is (true image, partner 1) in random slots and the label
    is the true image's slot (0 or 1); with p = 1/3 it is (partner 1, partner 2) and the label is 2
    (neither). Returns (image indices of slot 0 (B,), of slot 1 (B,), labels (B,)), all on the features'
    device, no host sync. Needs B >= 3."""
    b = image_feat.shape[0]
    if b < 3:
        raise ValueError(
            f"text assignment needs at least 3 images per batch (two distinct partners), got {b}"
        )
    dev = image_feat.device
    if temp < 0:
        raise ValueError(f"text assignment's partner temperature must be >= 0 (0 = uniform), got {temp}")
    if temp == 0:
        logits = torch.zeros((b, b), device=dev)
    else:
        logits = image_feat.float() @ image_feat.float().t() / temp  # (B, B)
    logits.fill_diagonal_(float("-inf"))
    u = torch.rand(logits.shape, device=dev, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))
    partners = (logits + gumbel).topk(2, dim=1).indices  # (B, 2): two distinct draws without replacement
    r = torch.rand((b,), device=dev, generator=generator)
    own = torch.arange(b, device=dev)
    labels = torch.where(r < 1.0 / 3.0, 0, torch.where(r < 2.0 / 3.0, 1, 2))  # slot of the true image / 2
    slot0 = torch.where(labels == 0, own, partners[:, 0])
    slot1 = torch.where(labels == 1, own, torch.where(labels == 0, partners[:, 0], partners[:, 1]))
    return slot0, slot1, labels
