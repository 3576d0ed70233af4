"""Pure-torch reference implementations of the ops that later fused kernels must match.

These functions know nothing of ALBEF's modules: they take tensors and return tensors. Every fused kernel
in this folder is tested against the function of the same name here (forward and every gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["itc_loss_reference", "mlm_loss_reference", "ema_update_reference", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row -sum(targets * log_softmax(logits)) over the last axis. (N, C), (N, C) -> (N,)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def _itc_direction(
    feat: torch.Tensor, feat_m: torch.Tensor, bank: torch.Tensor, temp: torch.Tensor, alpha: float
) -> torch.Tensor:
    # feat, feat_m: (B, D); bank: (B + Q, D) = [momentum batch of the other modality; its queue].
    # The positive of row i is bank row i.
    b = feat.shape[0]
    sim = feat @ bank.t() / temp  # (B, B+Q), carries gradient to feat and temp
    with torch.no_grad():
        sim_m = feat_m @ bank.t() / temp  # momentum similarities (targets carry no gradient)
        targets = alpha * F.softmax(sim_m, dim=1)
        targets[torch.arange(b, device=feat.device), torch.arange(b, device=feat.device)] += 1.0 - alpha
    return soft_cross_entropy(sim, targets).mean()


def itc_loss_reference(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_bank: torch.Tensor,
    text_bank: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Image-text contrastive loss with momentum distillation (ALBEF eq. 1-3, with MoD targets).

    image_feat, text_feat:     (B, D) online unit features (gradients flow into these and `temp`)
    image_feat_m, text_feat_m: (B, D) momentum unit features
    image_bank, text_bank:     (B + Q, D) candidates = [momentum batch; queue] of each modality
    temp: (1,) or () temperature; alpha: weight of the momentum-distilled targets.

      s_i2t = image_feat @ text_bank^T / temp,   s_i2t_m = image_feat_m @ text_bank^T / temp
      y_i2t = alpha * softmax(s_i2t_m) + (1 - alpha) * onehot(i)
      L_i2t = mean_i  -sum_j y_i2t[i, j] * log_softmax(s_i2t)[i, j]        (and t2i symmetric)
      L = (L_i2t + L_t2i) / 2

    Computed in fp32 whatever the input dtype (features may be bf16 while the banks are fp32).
    """
    t = temp.float().reshape(())
    f_i, f_t = image_feat.float(), text_feat.float()
    fm_i, fm_t = image_feat_m.float(), text_feat_m.float()
    loss_i2t = _itc_direction(f_i, fm_i, text_bank.float(), t, alpha)
    loss_t2i = _itc_direction(f_t, fm_t, image_bank.float(), t, alpha)
    return (loss_i2t + loss_t2i) / 2


def mlm_loss_reference(
    logits: torch.Tensor, labels: torch.Tensor, soft_targets: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """Masked-language loss with momentum distillation.

    logits: (K, V) predictions at the selected positions; labels: (K,) token ids, -100 = not scored
    (padding slots); soft_targets: (K, V) momentum probabilities over the vocabulary (or None: alpha is
    then ignored).

      L = (1 - alpha) * CE(logits, labels) + alpha * mean_k -sum_v soft[k, v] * log_softmax(logits)[k, v]

    Both terms average over the scored rows only; the soft term is taken over the vocabulary axis (the
    reference took it over the wrong axis until March 2022). With no scored row the loss is 0 (and still
    differentiable), so a batch without masked tokens cannot produce NaN.
    """
    logits = logits.float()
    valid = labels != -100
    n = valid.sum().clamp(min=1)
    logp = F.log_softmax(logits, dim=-1)
    safe_labels = labels.clamp(min=0)
    hard = -(logp.gather(1, safe_labels[:, None]).squeeze(1) * valid).sum() / n
    if soft_targets is None:
        return hard
    soft = (-(soft_targets.float() * logp).sum(dim=-1) * valid).sum() / n
    return (1.0 - alpha) * hard + alpha * soft


@torch.no_grad()
def ema_update_reference(
    momentum_tensors: Sequence[torch.Tensor], online_tensors: Sequence[torch.Tensor], m: float
) -> None:
    """m_p <- m * m_p + (1 - m) * p, one tensor at a time (the reference loop every fused EMA must match).

    The momentum tensors may be fp32 while the online ones are bf16: the source is upcast first, so a
    momentum of 0.995 is not lost to bf16 rounding.
    """
    if len(momentum_tensors) != len(online_tensors):
        raise ValueError(f"EMA got {len(momentum_tensors)} momentum and {len(online_tensors)} online tensors")
    for pm, p in zip(momentum_tensors, online_tensors):
        pm.mul_(m).add_(p.detach().to(pm.dtype), alpha=1.0 - m)
