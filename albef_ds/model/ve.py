"""ALBEF for SNLI-VE (visual entailment): the encoders and a 3-class MLP head on the fusion [CLS], with
momentum distillation (DOWNSTREAM_SPEC.md section 3).

    visual_encoder.*, text_encoder.bert.*    from pre-training (no MLM head)
    cls_head.{0,2}.*                         Linear(H, H) -> ReLU -> Linear(H, 3), random
    *_m                                      momentum copies of the three (the head's: a clone of the random
                                             head; the encoders': the loaded momentum weights)

Classes: entailment 2, neutral 1, contradiction 0. Loss: `losses.distill_ce` with the teacher's logits.
Single-device code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .encoders import build_text_encoder
from .losses import distill_ce
from .momentum import MomentumModel, MomentumPairs, momentum_autocast
from .vit import build_vit


def classifier_head(hidden: int, classes: int) -> nn.Sequential:
    """The reference's `cls_head`: Linear(H, H) -> ReLU -> Linear(H, classes) (keys cls_head.0.*, .2.*)."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


@dataclass
class ClassifyOutput:
    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # (B, C) of the online model, detached
    correct: torch.Tensor  # (B,) float: argmax == label (for a training accuracy without host sync)


class ALBEFVE(MomentumModel, nn.Module):
    """The SNLI-VE module (see the module docstring)."""

    classes = 3

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg.vision)
        self.text_encoder = build_text_encoder(cfg, mlm_head=False)
        self.cls_head = classifier_head(cfg.text.hidden, self.classes)
        self.momentum = MomentumPairs(self, ("visual_encoder", "text_encoder", "cls_head"), cfg.momentum)

    def logits(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        momentum: bool = False,
    ) -> torch.Tensor:
        """(B, 3, S, S) images + (B, L) hypotheses -> (B, 3) class logits from the fusion [CLS]."""
        sfx = "_m" if momentum else ""
        image_embeds = getattr(self, "visual_encoder" + sfx).forward_features(image)
        states = getattr(self, "text_encoder" + sfx).bert(input_ids, attention_mask, image_embeds)
        return getattr(self, "cls_head" + sfx)(states[:, 0])

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        label: torch.Tensor,
        *,
        alpha: float,
    ) -> ClassifyOutput:
        z = self.logits(image, input_ids, attention_mask)
        z_m = None
        if alpha > 0:
            with torch.no_grad(), momentum_autocast(image, self.momentum_dtype()):
                z_m = self.logits(image, input_ids, attention_mask, momentum=True)
        label = label.to(z.device)
        loss = distill_ce(z, z_m, label, alpha)
        return ClassifyOutput(loss, z.detach(), (z.detach().argmax(1) == label).float())
