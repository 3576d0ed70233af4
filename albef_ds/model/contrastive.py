"""What every contrastive ALBEF task model holds, assembled from the shared parts: the encoders
(`encoders.py`), their momentum copies with one fused EMA (`momentum.py`) and the feature queues with optional
id columns and an injected gather (`queue.py`). Pre-training and retrieval (and the downstream tasks) add
only their heads and losses.

The parts register their modules and buffers on the model itself, so the state-dict keys stay the
reference's (`visual_encoder.*`, `visual_encoder_m.*`, `image_queue`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from . import encoders
from .losses import itm_pair_logits
from .momentum import MomentumModel, MomentumPairs, momentum_autocast
from .queue import AllGather, FeatureQueue, identity_gather


class ContrastiveALBEF(MomentumModel, nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        special_tokens: dict[str, int],
        loss_weights: tuple[float, float, float],
        mlm_head: bool,
        all_gather: AllGather | None = None,
        id_columns: tuple[str, ...] = (),
    ) -> None:
        """special_tokens: ids of 'pad', 'cls', 'mask' (from the tokenizer); loss_weights: (ITC, ITM, MLM);
        mlm_head: keep the text encoder's MLM head; id_columns: extra queue columns (e.g. image ids)."""
        super().__init__()
        missing = {"pad", "cls", "mask"} - set(special_tokens)
        if missing:
            raise ValueError(f"special_tokens lacks {sorted(missing)}")
        self.cfg = cfg
        self.special_tokens = dict(special_tokens)
        self.loss_weights = loss_weights
        for name, part in encoders.build_encoders(cfg, mlm_head=mlm_head).items():
            setattr(self, name, part)
        self.momentum = MomentumPairs(self, encoders.CONTRASTIVE_MOMENTUM_NAMES, cfg.momentum)
        self.queue = FeatureQueue(
            self,
            size=cfg.queue_size,
            dim=cfg.embed_dim,
            seed=cfg.queue_seed,
            all_gather=all_gather if all_gather is not None else identity_gather,
            id_columns=id_columns,
        )

    @property
    def all_gather(self) -> AllGather:
        """The injected collective of the queue (settable)."""
        return self.queue.all_gather

    @all_gather.setter
    def all_gather(self, fn: AllGather) -> None:
        self.queue.all_gather = fn

    # ------------------------------------------------------------------ momentum
    def _momentum_precision(self, image: torch.Tensor):
        """Autocast for the momentum forward when a low-precision engine feeds fp32 momentum weights."""
        return momentum_autocast(image, self.image_queue.dtype)

    # ------------------------------------------------------------------ encoders
    def clamped_temp(self) -> torch.Tensor:
        """Temperature clamped to [temp_min, temp_max], out of place, with a straight-through gradient."""
        return encoders.clamped_temp(self.temp, self.cfg.temp_min, self.cfg.temp_max)

    def negative_temp(self, temp: torch.Tensor) -> torch.Tensor:
        """The temperature of the ITM hard-negative draw: `temp` (the clamped ITC one, ALBEF's) unless
        `model.itm_neg_temp` sets another."""
        t = self.cfg.itm_neg_temp
        return temp if t <= 0 else torch.full_like(temp, t)

    def encode_image(
        self, image: torch.Tensor, *, momentum: bool = False, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (tokens (B, 1+N, W), unit feature (B, D)); `keep` (B, K): only these patches
        (patch dropout), tokens (B, 1+K, W)."""
        if momentum:
            return encoders.encode_image(self.visual_encoder_m, self.vision_proj_m, image, keep)
        return encoders.encode_image(self.visual_encoder, self.vision_proj, image, keep)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, momentum: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) -> (states (B, L, H), unit feature (B, D))."""
        if momentum:
            return encoders.encode_text(self.text_encoder_m, self.text_proj_m, input_ids, attention_mask)
        return encoders.encode_text(self.text_encoder, self.text_proj, input_ids, attention_mask)

    def itm_logits(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        neg_image: torch.Tensor,
        neg_text: torch.Tensor,
    ) -> torch.Tensor:
        """ITM logits (3B, 2) of [positives; (text, negative image); (negative text, image)] in one fusion
        pass; neg_image / neg_text: (B,) indices of each text's negative image and each image's negative
        text."""
        return itm_pair_logits(
            self.text_encoder.bert.fuse,
            self.itm_head,
            text_embeds,
            attention_mask,
            image_embeds,
            neg_image,
            neg_text,
        )
