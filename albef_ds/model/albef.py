"""The ALBEF pre-training module, composed of the shared parts: the encoders (`encoders.py`), the momentum
copies with one fused EMA (`momentum.py`), the feature queues (`queue.py`) and the three losses (ITC with
momentum distillation, ITM with hard negatives, MLM with momentum distillation).

Single-device code: the only collective (gathering momentum features for the queue) is injected as
`all_gather`; the identity is used in one process. Nothing here imports deepspeed or torch.distributed.
How the step executes (fused or reference EMA/ITC, sampler, MLM head positions) is `ops` (`ops.py`); an
optional `sections` hook (name -> context manager) is entered around the parts of the forward.

The state-dict keys are the reference's (`visual_encoder.*`, `visual_encoder_m.*`, `text_encoder.bert.*`,
`text_encoder.cls.*`, `image_queue`, `text_queue`, `queue_ptr`, ...): the parts register their modules and
buffers on this module directly, so nothing gains a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from . import encoders
from .contrastive import ContrastiveALBEF
from .losses import (
    draw_hard_negatives,
    itm_loss,
    mask_tokens,
    mlm_capacity,
    select_scored_positions,
)
from .momentum import params_to_buffers
from .ops import PretrainOps, Sections, no_sections
from .queue import AllGather, identity_gather
from .vit import draw_patch_keep

__all__ = [
    "MOMENTUM_PAIRS",
    "ALBEFPretrain",
    "AllGather",
    "PretrainOutput",
    "identity_gather",
    "params_to_buffers",
]


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # weighted sum, scalar
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_mlm: torch.Tensor
    image_feat_m: torch.Tensor  # (B, D) momentum features to enqueue once per optimizer step
    text_feat_m: torch.Tensor


# (online attribute, momentum attribute) pairs, in the reference's naming.
MOMENTUM_PAIRS = tuple((n, n + "_m") for n in encoders.CONTRASTIVE_MOMENTUM_NAMES)


class ALBEFPretrain(ContrastiveALBEF):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        special_tokens: dict[str, int],
        all_gather: AllGather = identity_gather,
        loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        ops: PretrainOps | None = None,
        sections: Sections | None = None,
    ) -> None:
        """special_tokens: ids of 'pad', 'cls', 'mask' (from the tokenizer); ops: how the step executes
        (default: ours); sections: optional name -> context manager hook around the parts of the forward
        (`ops.SECTION_NAMES`). `ops` and `sections` are execution choices, not model state: both may be set
        on the module later."""
        super().__init__(
            cfg,
            special_tokens=special_tokens,
            loss_weights=loss_weights,
            mlm_head=True,
            all_gather=all_gather,
        )
        self.ops = ops if ops is not None else PretrainOps()
        self.sections = sections

    def ema_update_fn(self):
        return self.ops.ema_update

    def _section(self, name: str):
        return (self.sections or no_sections)(name)

    # ------------------------------------------------------------------ queue
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        """Gather the momentum features of the global batch (one collective) and write them into the ring
        (see `FeatureQueue`: any global batch and queue size; padded gathers without a host sync)."""
        self.queue.enqueue(image_feat_m, text_feat_m)

    # ------------------------------------------------------------------ forward
    def forward(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, alpha: float
    ) -> PretrainOutput:
        """Losses of one batch. Does not update the momentum model or the queues (see `momentum_update` and
        `enqueue`, called once per optimizer step by the trainer)."""
        b = image.shape[0]
        if b < 2:
            raise ValueError("ALBEF pre-training needs at least 2 samples per batch (ITM negatives)")
        temp = self.clamped_temp()
        ops = self.ops

        keep = self.patch_keep(image)
        keep_m = keep if self.cfg.vision.patch_dropout_momentum else None

        with self._section("online_forward"):
            # One online image pass: its tokens (the kept patches under patch dropout) feed ITC ([CLS]),
            # ITM and MLM alike.
            image_embeds, image_feat = self.encode_image(image, keep=keep)
            text_embeds, text_feat = self.encode_text(input_ids, attention_mask)

        with torch.no_grad(), self._momentum_precision(image), self._section("momentum_forward"):
            image_embeds_m, image_feat_m = self.encode_image(image, momentum=True, keep=keep_m)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)
            image_bank = torch.cat([image_feat_m.to(self.image_queue.dtype), self.image_queue], dim=0)
            text_bank = torch.cat([text_feat_m.to(self.text_queue.dtype), self.text_queue], dim=0)

        # ---- ITC with momentum distillation over [batch; queue]
        with self._section("itc"):
            loss_itc = ops.itc_loss(
                image_feat, text_feat, image_feat_m, text_feat_m, image_bank, text_bank, temp, alpha
            )

        # ---- ITM with in-batch hard negatives (weights = softmax of the in-batch ITC similarities)
        with self._section("itm"):
            neg_image, neg_text = draw_hard_negatives(
                image_feat,
                text_feat,
                image_feat_m,
                text_feat_m,
                self.negative_temp(temp),
                ops.sample_hard_negatives,
            )
            logits = self.itm_logits(text_embeds, attention_mask, image_embeds, neg_image, neg_text)
            loss_itm = itm_loss(logits, b)

        with self._section("mlm"):
            loss_mlm = self._mlm(input_ids, attention_mask, image, image_embeds, image_embeds_m, alpha)

        w_itc, w_itm, w_mlm = self.loss_weights
        loss = w_itc * loss_itc + w_itm * loss_itm + w_mlm * loss_mlm
        return PretrainOutput(loss, loss_itc, loss_itm, loss_mlm, image_feat_m, text_feat_m)

    def patch_keep(self, image: torch.Tensor) -> torch.Tensor | None:
        """The patches the online ViT keeps in this forward (B, K), or None for all of them: patch dropout
        (`model.vision.patch_dropout`) applies in training mode only, so evaluation always sees every patch,
        and at 0 nothing is drawn (the random streams, hence the whole step, are as without the option)."""
        v = self.cfg.vision
        if not self.training or v.patch_dropout <= 0.0:
            return None
        n = (image.shape[-1] // v.patch_size) * (image.shape[-2] // v.patch_size)
        return draw_patch_keep(image.shape[0], n, v.patch_dropout, image.device)

    def _mlm(self, input_ids, attention_mask, image, image_embeds, image_embeds_m, alpha):
        """MLM with momentum distillation; the vocabulary head runs on the masked positions only
        (`ops.mlm_head_positions` "masked"), or on all of them ("all")."""
        st = self.special_tokens
        masked_ids, labels = mask_tokens(
            input_ids,
            vocab_size=self.cfg.text.vocab_size,
            mask_token_id=st["mask"],
            pad_token_id=st["pad"],
            cls_token_id=st["cls"],
            probability=self.cfg.mlm_probability,
        )
        states = self.text_encoder.bert(masked_ids, attention_mask, image_embeds)  # (B, L, H)
        with torch.no_grad(), self._momentum_precision(image):
            states_m = self.text_encoder_m.bert(masked_ids, attention_mask, image_embeds_m)
        states, states_m = states.flatten(0, 1), states_m.flatten(0, 1)  # (B x L, H)
        if self.ops.mlm_head_positions == "all":
            scored = labels.flatten()
        else:  # a static number K of rows: no host sync
            capacity = mlm_capacity(labels.numel(), self.cfg.mlm_probability)
            index, scored = select_scored_positions(labels, capacity)
            states, states_m = states.index_select(0, index), states_m.index_select(0, index)  # (K, H)
        logits = self.text_encoder.cls(states)  # (K, V)
        with torch.no_grad(), self._momentum_precision(image):
            soft = F.softmax(self.text_encoder_m.cls(states_m).float(), dim=-1)
        return self.ops.mlm_loss(logits, scored, soft, alpha)
