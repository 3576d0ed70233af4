"""Attention probabilities on request, without global state (for Grad-CAM).

ALBEF's Grad-CAM (grounding) needs one layer's attention probabilities A = softmax(QK^T / sqrt(d) + mask)
as a tensor in the autograd graph, so that d(score)/dA can be taken. SDPA never materialises A, so the
chosen layer computes its attention explicitly while, and only while, `keep_attention` is open on that
module instance:

    attn = model.text_encoder.bert.encoder.layer[8].crossattention
    with keep_attention(attn) as kept:
        score = ...forward...            # kept.probs: (B, heads, Lq, Lk), in the graph
    (grad,) = torch.autograd.grad(score, kept.probs)

Every other layer, and this one outside the block, runs F.scaled_dot_product_attention exactly as before.
The state lives on the one module instance (set on entry, restored on exit), never in a module global.

Works on modules with a `kept` attribute (our BertAttention: self- or cross-attention) and on timm's ViT
`Attention` (the blocks of `visual_encoder`), whose forward is replaced on the instance for the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn


@dataclass
class KeptAttention:
    """What a kept layer hands back: the probabilities of its latest forward inside the block."""

    probs: torch.Tensor | None = None  # (B, heads, Lq, Lk) fp32, before dropout, in the autograd graph


def attention_with_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention: (softmax(q k^T * scale + mask) v, the probabilities).

    q: (B, h, Lq, d); k, v: (B, h, Lk, d); mask: None, bool (True = attend) or additive float, broadcastable
    to (B, h, Lq, Lk); scale defaults to 1/sqrt(d), as SDPA's. Scores and probabilities are fp32; dropout
    (as SDPA's) acts on the product, the returned probabilities are the undropped ones.

    When grad mode is on but the probabilities do not require grad (frozen weights, plain inputs), they are
    made a leaf that does, so that d(score)/d(probs) exists either way.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, h, Lq, Lk)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    if torch.is_grad_enabled() and not probs.requires_grad:
        probs = probs.detach().requires_grad_()
    used = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return used.to(v.dtype) @ v, probs


def _timm_attention_forward(
    attn: TimmAttention,
    kept: KeptAttention,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    # timm's Attention.forward (timm 1.0.x) with the explicit attention; x: (B, N, C).
    if is_causal:
        raise NotImplementedError("keep_attention does not support causal ViT attention")
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = attn.attn_drop.p if attn.training else 0.0
    out, kept.probs = attention_with_probs(q, k, v, attn_mask, scale=attn.scale, dropout_p=p)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


@contextlib.contextmanager
def keep_attention(module: nn.Module) -> Iterator[KeptAttention]:
    """Within the block, `module` computes its attention explicitly and stores the probabilities of each
    forward in the yielded `KeptAttention`; on exit the module is put back as it was (SDPA)."""
    kept = KeptAttention()
    # Compiled blocks (`model.compile.compile_blocks`) run eagerly within the block: a graph compiled for SDPA
    # must not answer instead of the explicit attention, and the probabilities (a leaf made to require grad,
    # stored on `kept`) are no graph output. The stance is process-wide and restored on exit.
    with torch.compiler.set_stance("force_eager"), _kept_on(module, kept):
        yield kept


@contextlib.contextmanager
def _kept_on(module: nn.Module, kept: KeptAttention) -> Iterator[None]:
    if isinstance(module, TimmAttention):
        previous = vars(module).get("forward")  # an instance override (an enclosing block), or None
        module.forward = partial(_timm_attention_forward, module, kept)
        try:
            yield
        finally:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
    elif hasattr(module, "kept"):
        previous = module.kept
        module.kept = kept
        try:
            yield
        finally:
            module.kept = previous
    else:
        raise TypeError(
            f"keep_attention needs a BertAttention or a timm ViT Attention, got {type(module).__name__}"
        )
