"""ALBEF for image-text retrieval fine-tuning: ITC with same-image positives + ITM with hard negatives.

Built from the same parts as the pre-training module: the encoders without the MLM head (retrieval never
uses it, and a parameter without a gradient only costs optimizer state), the momentum copies, and the
feature queues with an image-id column (`idx_queue`). The state-dict keys are the pre-training module's
(less `text_encoder[_m].cls.*`) plus `idx_queue`, so a pre-training checkpoint loads. Differences from
pre-training:

- ITC: every candidate (in the batch or in the queue) with the same image id as the query is a positive;
  the hard target spreads (1 - alpha) evenly over them (a COCO image has five captions, and a batch or the
  queue often holds two of them). Momentum distillation as in pre-training: alpha * softmax of the
  momentum similarities.
- ITM: the hard negative of each image (text) is drawn from the in-batch softmax with every same-id
  candidate excluded (-inf before the softmax, Gumbel-max, no per-sample loop). A row whose every other
  candidate shares its id has no negative: its negative pair is left out of the loss instead of training
  on a positive labelled as a negative (the reference's multinomial would fail on such a row).
- no MLM. Loss = L_itc + L_itm.

Same step protocol as pre-training: the trainer calls `momentum_update()`, `forward()`, backward and the
optimizer step, then `enqueue(image_feat_m, text_feat_m, idx)` once per optimizer step.
Single-device code: the one collective (gathering the queue entries) is injected as `all_gather`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .contrastive import ContrastiveALBEF
from .losses import (
    draw_hard_negatives,
    itc_loss_multi_positive,
    sample_negatives_excluding,
)
from .queue import MAX_EXACT_ID, NO_ID, AllGather

__all__ = [
    "MAX_EXACT_ID",
    "NO_ID",
    "ALBEFRetrieval",
    "RetrievalOutput",
    "itc_loss_multi_positive",
    "sample_negatives_excluding",
]


@dataclass
class RetrievalOutput:
    loss: torch.Tensor  # L_itc + L_itm, scalar
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    image_feat_m: torch.Tensor  # (B, D) momentum features to enqueue once per optimizer step
    text_feat_m: torch.Tensor
    idx: torch.Tensor  # (B,) image ids of the batch (enqueued with the features)


class ALBEFRetrieval(ContrastiveALBEF):
    """The retrieval fine-tuning module (see the module docstring). Same constructor as ALBEFPretrain."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        special_tokens: dict[str, int],
        all_gather: AllGather | None = None,
        loss_weights: tuple[float, float, float] = (1.0, 1.0, 0.0),
    ) -> None:
        """special_tokens: ids of 'pad', 'cls', 'mask' (from the tokenizer); loss_weights: (ITC, ITM, MLM),
        the MLM weight unused (the pre-training module's triple, so one config serves both)."""
        super().__init__(
            cfg,
            special_tokens=special_tokens,
            loss_weights=loss_weights,
            mlm_head=False,
            all_gather=all_gather,
            id_columns=("idx_queue",),
        )

    # ------------------------------------------------------------------ queue
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor) -> None:
        """Gather (image feature, text feature, id) of the global batch in one collective and write them
        into the ring at (ptr + i) mod Q. Rows the gather marks as padding are skipped without a host sync
        (as long as the global batch fits the queue)."""
        self.queue.enqueue(image_feat_m, text_feat_m, idx)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        alpha: float,
        idx: torch.Tensor,
    ) -> RetrievalOutput:
        """Losses of one batch; idx: (B,) integer image ids (>= 0). Does not update the momentum model or
        the queues (`momentum_update` before, `enqueue` after the optimizer step)."""
        b = image.shape[0]
        if b < 2:
            raise ValueError("retrieval fine-tuning needs at least 2 samples per batch (ITM negatives)")
        temp = self.clamped_temp()
        idx = idx.to(image.device).long()

        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)
        with torch.no_grad(), self._momentum_precision(image):
            _, image_feat_m = self.encode_image(image, momentum=True)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)
            image_feat_m, text_feat_m = image_feat_m.float(), text_feat_m.float()
            image_bank = torch.cat([image_feat_m.to(self.image_queue.dtype), self.image_queue], dim=0)
            text_bank = torch.cat([text_feat_m.to(self.text_queue.dtype), self.text_queue], dim=0)
            idx_all = torch.cat([idx, self.idx_queue])  # (B + Q,)
            pos = idx[:, None] == idx_all[None, :]  # (B, B+Q) same image id = positive

        # ---- ITC: same-id positives, momentum distillation over [batch; queue]
        loss_i2t = itc_loss_multi_positive(image_feat, image_feat_m, text_bank, pos, temp, alpha)
        loss_t2i = itc_loss_multi_positive(text_feat, text_feat_m, image_bank, pos, temp, alpha)
        loss_itc = (loss_i2t + loss_t2i) / 2

        # ---- ITM: one positive and two hard negatives per sample, same-id candidates excluded
        same = pos[:, :b]  # (B, B), symmetric, diagonal True
        excluding_same = partial(sample_negatives_excluding, same=same)
        (neg_image, ok_image), (neg_text, ok_text) = draw_hard_negatives(
            image_feat, text_feat, image_feat_m, text_feat_m, self.negative_temp(temp), excluding_same
        )
        logits = self.itm_logits(text_embeds, attention_mask, image_embeds, neg_image, neg_text)  # (3B, 2)
        labels = torch.cat(
            [
                torch.ones(b, dtype=torch.long, device=image.device),
                torch.where(ok_image, 0, -100),  # -100: no negative for this row, left out of the loss
                torch.where(ok_text, 0, -100),
            ]
        )
        loss_itm = F.cross_entropy(logits.float(), labels, ignore_index=-100)

        w_itc, w_itm, _ = self.loss_weights
        loss = w_itc * loss_itc + w_itm * loss_itm
        return RetrievalOutput(loss, loss_itc, loss_itm, image_feat_m, text_feat_m, idx)
