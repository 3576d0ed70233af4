"""ALBEF for image-text retrieval fine-tuning: ITC with same-image positives + ITM with hard negatives.

Reuses the pre-training module's encoders, projections, ITM head, temperature, momentum copies and queues
(`ALBEFPretrain`), drops the MLM head (retrieval never uses it, and a parameter without a gradient only
costs optimizer state), and adds an id queue beside the feature queues. Differences from pre-training:

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

import torch
import torch.nn.functional as F

from .. import kernels
from .albef import ALBEFPretrain

NO_ID = -100  # id of queue slots that hold no real sample (never equal to a sample's id, which is >= 0)
MAX_EXACT_ID = 2**24  # ids travel through the (float) queue gather: exact below 2^24


@dataclass
class RetrievalOutput:
    loss: torch.Tensor  # L_itc + L_itm, scalar
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    image_feat_m: torch.Tensor  # (B, D) momentum features to enqueue once per optimizer step
    text_feat_m: torch.Tensor
    idx: torch.Tensor  # (B,) image ids of the batch (enqueued with the features)


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


def sample_negatives_excluding(
    sim: torch.Tensor, same: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i of a (B, B) similarity matrix draw a column j with same[i, j] False, with probability
    softmax over the allowed columns (Gumbel-max: argmax(sim + Gumbel noise) with the excluded columns at
    -inf; one kernel, no host sync). Returns (LongTensor (B,), valid (B,) bool): rows whose every column is
    excluded have no negative (valid False; their drawn index is meaningless)."""
    logits = sim.detach().float().masked_fill(same, float("-inf"))
    u = torch.rand(logits.shape, device=logits.device, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))
    return (logits + gumbel).argmax(dim=1), ~same.all(dim=1)


class ALBEFRetrieval(ALBEFPretrain):
    """The retrieval fine-tuning module (see the module docstring). Same constructor as ALBEFPretrain."""

    def __init__(self, cfg, *, special_tokens, all_gather=None, loss_weights=(1.0, 1.0, 0.0)) -> None:
        kw = {} if all_gather is None else {"all_gather": all_gather}
        super().__init__(cfg, special_tokens=special_tokens, loss_weights=loss_weights, **kw)
        # No MLM head in retrieval (online and momentum, so the momentum pairs still mirror each other).
        del self.text_encoder.cls
        del self.text_encoder_m.cls
        self.register_buffer("idx_queue", torch.full((cfg.queue_size,), NO_ID, dtype=torch.long))

    # ------------------------------------------------------------------ queue
    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor) -> None:
        """Gather (image feature, text feature, id) of the global batch in one collective and write them
        into the ring at (ptr + i) mod Q. Rows the gather marks as padding are skipped without a host sync
        (as long as the global batch fits the queue)."""
        q = self.image_queue.shape[0]
        if q == 0:
            return
        d = image_feat_m.shape[1]
        dt = self.image_queue.dtype
        packed = torch.cat([image_feat_m.to(dt), text_feat_m.to(dt), idx.to(dt)[:, None]], dim=1)  # (B, 2D+1)
        gathered = self.all_gather(packed)
        valid = None
        if isinstance(gathered, tuple):
            gathered, valid = gathered
        if valid is None:
            valid = torch.ones(gathered.shape[0], dtype=torch.bool, device=gathered.device)
        if gathered.shape[0] > q:  # more rows than slots: keep the newest q real ones (a host sync; rare)
            gathered = gathered[valid][-q:]
            valid = torch.ones(gathered.shape[0], dtype=torch.bool, device=gathered.device)
        g = gathered.shape[0]
        order = torch.sort((~valid).to(torch.uint8), stable=True).indices  # real rows first, in order
        rows = gathered[order]
        n = valid.sum()
        pos = torch.arange(g, device=rows.device)
        slots = (self.queue_ptr + pos) % q
        keep = (pos < n)[:, None]
        self.image_queue.index_copy_(0, slots, torch.where(keep, rows[:, :d], self.image_queue[slots]))
        self.text_queue.index_copy_(0, slots, torch.where(keep, rows[:, d : 2 * d], self.text_queue[slots]))
        ids = rows[:, 2 * d].round().to(self.idx_queue.dtype)
        self.idx_queue.index_copy_(0, slots, torch.where(keep[:, 0], ids, self.idx_queue[slots]))
        self.queue_ptr.copy_((self.queue_ptr + n) % q)

    # ------------------------------------------------------------------ forward
    def forward(  # type: ignore[override]
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
        with torch.no_grad():
            t = temp.detach().float()
            same = pos[:, :b]  # (B, B), symmetric, diagonal True
            sim_i2t = image_feat.detach().float() @ text_feat_m.t() / t
            sim_t2i = text_feat.detach().float() @ image_feat_m.t() / t
            neg_image, ok_image = sample_negatives_excluding(sim_t2i, same)  # a negative image per text
            neg_text, ok_text = sample_negatives_excluding(sim_i2t, same)  # a negative text per image
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], dim=0)
        mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]], dim=0)
        image_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)
        logits = self.itm_head(self.text_encoder.bert.fuse(text_all, mask_all, image_all)[:, 0])  # (3B, 2)
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
