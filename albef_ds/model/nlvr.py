"""ALBEF for NLVR2 (a sentence about a pair of images: true or false) and its text-assignment (TA)
pre-training, DOWNSTREAM_SPEC.md section 2.

Paired fusion. The text/fusion BERT keeps its text layers [0, f) and turns each pre-trained fusion layer
f + k into two consecutive blocks f + 2k (cross-attends to image 0) and f + 2k + 1 (to image 1), both
initialised from that layer (`model.weights.derive_pairs`), so the 12-layer ALBEF-base encoder becomes 18
blocks. Within a pair the cross-attention key and value projections are one module (the same Parameters,
one optimizer entry); queries, output projections, LayerNorms, self-attention and FFN are the block's own.
The ViT runs once on [image0; image1] and its tokens are split.

    ALBEFNLVR2:          visual_encoder, text_encoder (paired), cls_head (Linear H->H, ReLU, Linear H->2),
                         momentum copies of the three; loss `losses.distill_ce`; label True = 1.
    ALBEFTextAssignment: visual_encoder, text_encoder (paired), vision_proj (for the partner draw), ta_head
                         (Linear H->3); no momentum model; labels from `losses.text_assignment`.

The NLVR2 teacher is copied from the student after the weights are loaded (the reference copied it before
loading a TA checkpoint that has no momentum weights, so its teacher started random).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .bert import BertModel, _init_bert_weights, _key_mask
from .losses import distill_ce, text_assignment
from .momentum import MomentumModel, MomentumPairs, momentum_autocast
from .ve import ClassifyOutput, classifier_head
from .vit import build_vit


class PairedBertModel(BertModel):
    """BERT with text layers [0, f) and 2 x (layers - f) fusion blocks that alternate between two images,
    key/value projections of each pair's cross-attention tied."""

    def __init__(self, cfg, *, cross_width: int) -> None:
        pairs = cfg.layers - cfg.fusion_layer
        super().__init__(
            dataclasses.replace(cfg, layers=cfg.fusion_layer + 2 * pairs), cross_width=cross_width
        )
        self.pairs = pairs  # fusion layers of the source = block pairs here
        f = self.fusion_layer
        for k in range(self.pairs):
            even, odd = self.encoder.layer[f + 2 * k], self.encoder.layer[f + 2 * k + 1]
            # The even block reuses the odd block's key and value Linears (the reference ties them so).
            even.crossattention.self.key = odd.crossattention.self.key
            even.crossattention.self.value = odd.crossattention.self.value

    def fuse_pair(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image0: torch.Tensor,
        image1: torch.Tensor,
    ) -> torch.Tensor:
        """(B, L, H) text states + two (B, N, W) image token sets -> (B, L, H) multimodal states."""
        mask = _key_mask(attention_mask)
        x = text_states
        for i, layer in enumerate(self.encoder.layer[self.fusion_layer :]):
            x = layer(x, mask, image0 if i % 2 == 0 else image1, None)
        return x


class PairedTextEncoder(nn.Module):
    """`text_encoder` of the NLVR2 models: `.bert` is the paired BERT (keys text_encoder.bert.*)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.bert = PairedBertModel(cfg.text, cross_width=cfg.vision.width)
        self.apply(functools.partial(_init_bert_weights, std=cfg.text.init_std))

    def forward(self, input_ids, attention_mask, image0, image1) -> torch.Tensor:
        """(B, L, H) multimodal states of the sentences over their image pairs."""
        return self.bert.fuse_pair(
            self.bert.encode_text(input_ids, attention_mask), attention_mask, image0, image1
        )


def _pair_tokens(
    vit: nn.Module, image0: torch.Tensor, image1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ViT pass over [image0; image1], split back: two (B, 1+N, W)."""
    b = image0.shape[0]
    tokens = vit.forward_features(torch.cat([image0, image1]))
    return tokens[:b], tokens[b:]


class ALBEFNLVR2(MomentumModel, nn.Module):
    """NLVR2 fine-tuning (module docstring)."""

    classes = 2

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg.vision)
        self.text_encoder = PairedTextEncoder(cfg)
        self.cls_head = classifier_head(cfg.text.hidden, self.classes)
        self.momentum = MomentumPairs(self, ("visual_encoder", "text_encoder", "cls_head"), cfg.momentum)

    def logits(self, image0, image1, input_ids, attention_mask, *, momentum: bool = False) -> torch.Tensor:
        """(B, 2) logits (false, true) of the sentences about their pairs."""
        sfx = "_m" if momentum else ""
        t0, t1 = _pair_tokens(getattr(self, "visual_encoder" + sfx), image0, image1)
        states = getattr(self, "text_encoder" + sfx)(input_ids, attention_mask, t0, t1)
        return getattr(self, "cls_head" + sfx)(states[:, 0])

    def forward(self, image0, image1, input_ids, attention_mask, label, *, alpha: float) -> ClassifyOutput:
        z = self.logits(image0, image1, input_ids, attention_mask)
        z_m = None
        if alpha > 0:
            with torch.no_grad(), momentum_autocast(image0, self.momentum_dtype()):
                z_m = self.logits(image0, image1, input_ids, attention_mask, momentum=True)
        label = label.to(z.device)
        return ClassifyOutput(
            distill_ce(z, z_m, label, alpha), z.detach(), (z.detach().argmax(1) == label).float()
        )


class ALBEFTextAssignment(nn.Module):
    """Text-assignment pre-training of the paired encoder (module docstring): for each caption, is its image
    in slot 0, in slot 1, or in neither? No momentum model."""

    classes = 3

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg.vision)
        self.text_encoder = PairedTextEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.ta_head = nn.Linear(cfg.text.hidden, self.classes)

    def momentum_update(self) -> None:
        """No momentum model in TA pre-training (the trainer's step calls this every step)."""

    def forward(self, image, input_ids, attention_mask, *, alpha: float = 0.0) -> ClassifyOutput:
        """Captions (B, L) with their own images (B, 3, S, S): partners drawn from the in-batch image
        similarities, 3-way labels, cross-entropy. `alpha` is unused (no distillation)."""
        tokens = self.visual_encoder.forward_features(image)  # (B, 1+N, W), once per image
        with torch.no_grad():
            feat = F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)
        slot0, slot1, label = text_assignment(feat, temp=self.cfg.ta_partner_temp)
        states = self.text_encoder(input_ids, attention_mask, tokens[slot0], tokens[slot1])
        z = self.ta_head(states[:, 0])
        loss = F.cross_entropy(z.float(), label)
        return ClassifyOutput(loss, z.detach(), (z.detach().argmax(1) == label).float())
