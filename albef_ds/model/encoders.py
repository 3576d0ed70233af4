"""The encoders every ALBEF task builds on: ViT, the text/fusion BERT, the projections, the ITM head and the
temperature, and the two ways of turning an input into (tokens, unit feature).

Encoders return features; the task modules (pre-training, retrieval, ...) own their losses, momentum copies
and queues. `build_encoders` returns the parts by the names the task module registers them under, which are
the released ALBEF checkpoints' names (`visual_encoder.*`, `text_encoder.bert.*`, `text_encoder.cls.*`,
`vision_proj.*`, `text_proj.*`, `itm_head.*`, `temp`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .bert import BertMLM
from .vit import build_vit, forward_tokens

# The online modules that have momentum twins in ALBEF's contrastive tasks, in the reference's order
# (the order of `momentum_pairs()`); the ITM head and the temperature have none.
CONTRASTIVE_MOMENTUM_NAMES = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")


def build_text_encoder(cfg: ModelConfig, *, mlm_head: bool = True) -> BertMLM:
    """The text + fusion encoder (cross-attention to the ViT's width), with or without its MLM head.

    Without the head (retrieval never uses it, and a parameter without a gradient still costs optimizer
    state) the encoder is built whole and the head dropped: the random initialisation draws the same numbers
    in the same order for every task, so one seed gives the same encoder weights in each of them.
    """
    enc = BertMLM(cfg.text, cross_width=cfg.vision.width)
    if not mlm_head:
        del enc.cls
    return enc


def build_encoders(cfg: ModelConfig, *, mlm_head: bool = True) -> dict[str, nn.Module | nn.Parameter]:
    """The contrastive ALBEF parts by their state-dict names, in registration order.

    That order fixes `parameters()` (optimizer states and DeepSpeed checkpoints record parameters by
    position) and the random initialisation: keep it. `temp` is an nn.Parameter of shape [1], not a 0-dim
    scalar: DeepSpeed's broadcast views parameters as bytes and fails on 0-dim ones.
    """
    vw, th, d = cfg.vision.width, cfg.text.hidden, cfg.embed_dim
    parts: dict[str, nn.Module | nn.Parameter] = {}
    parts["visual_encoder"] = build_vit(cfg.vision)
    parts["text_encoder"] = build_text_encoder(cfg, mlm_head=mlm_head)
    parts["vision_proj"] = nn.Linear(vw, d)
    parts["text_proj"] = nn.Linear(th, d)
    parts["itm_head"] = nn.Linear(th, 2)
    parts["temp"] = nn.Parameter(torch.full((1,), cfg.temp))
    return parts


def encode_image(
    encoder: nn.Module, proj: nn.Module, image: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) -> (tokens (B, 1+N, W), unit feature (B, D) of the [CLS] token); with `keep` (B, K)
    patch indices (patch dropout, `vit.draw_patch_keep`) the tokens are (B, 1+K, W)."""
    embeds = forward_tokens(encoder, image, keep)
    return embeds, F.normalize(proj(embeds[:, 0]), dim=-1)


def encode_text(
    encoder: BertMLM, proj: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) -> (text-only states (B, L, H), unit feature (B, D) of [CLS])."""
    states = encoder.bert.encode_text(input_ids, attention_mask)
    return states, F.normalize(proj(states[:, 0]), dim=-1)


def clamped_temp(temp: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Temperature clamped to [lo, hi], out of place, with a straight-through gradient.

    The reference clamps the parameter in place before each forward, so its gradient always flows; an
    in-place clamp here would only touch a low-precision copy under DeepSpeed, and a plain out-of-place
    clamp would freeze a temperature that left the range. Value: clamped; gradient: identity.
    """
    return temp + (temp.clamp(lo, hi) - temp).detach()
