"""The ALBEF pre-training module: encoders, projections, momentum copies, queues and the three losses.

Single-device code: the only collective (gathering momentum features for the queue) is injected as
`all_gather`; the identity is used in one process. Nothing here imports deepspeed or torch.distributed.

Momentum copies are stored as *buffers*, not parameters. So they are never in `parameters()` (never in an
optimizer, never given gradients), never cast by an engine that casts parameters to bf16 (their EMA stays
fp32: with m = 0.995 a bf16 EMA loses most updates to rounding), and still in `state_dict()` under the
reference's names (`visual_encoder_m.*`, `text_encoder_m.*`, ...).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .bert import BertMLM
from .losses import (
    itm_loss,
    mask_tokens,
    mlm_capacity,
    sample_hard_negatives,
    sample_hard_negatives_looped,
    select_scored_positions,
)
from .vit import build_vit

# An all_gather returns the gathered rows, or (rows, valid) when ranks may hold fewer rows than the padded
# size: `valid` (bool, one per row) marks the real ones, so no host-side count is needed.
AllGather = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


def identity_gather(x: torch.Tensor) -> torch.Tensor:
    """The one-process `all_gather`: the local batch is the global batch."""
    return x


def params_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of `module` into a persistent buffer of the same name (tied ones stay tied)."""
    seen: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            buf = seen.setdefault(id(p), p.detach().clone())
            del sub._parameters[name]
            sub.register_buffer(name, buf, persistent=True)
    return module


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # weighted sum, scalar
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_mlm: torch.Tensor
    image_feat_m: torch.Tensor  # (B, D) momentum features to enqueue once per optimizer step
    text_feat_m: torch.Tensor


# (online attribute, momentum attribute) pairs, in the reference's naming.
MOMENTUM_PAIRS = (
    ("visual_encoder", "visual_encoder_m"),
    ("vision_proj", "vision_proj_m"),
    ("text_encoder", "text_encoder_m"),
    ("text_proj", "text_proj_m"),
)


class ALBEFPretrain(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        special_tokens: dict[str, int],
        all_gather: AllGather = identity_gather,
        loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> None:
        """special_tokens: ids of 'pad', 'cls', 'mask' (from the tokenizer)."""
        super().__init__()
        missing = {"pad", "cls", "mask"} - set(special_tokens)
        if missing:
            raise ValueError(f"special_tokens lacks {sorted(missing)}")
        self.cfg = cfg
        self.special_tokens = dict(special_tokens)
        self.all_gather = all_gather
        self.loss_weights = loss_weights
        vw, th, d = cfg.vision.width, cfg.text.hidden, cfg.embed_dim

        self.visual_encoder = build_vit(cfg.vision)
        self.text_encoder = BertMLM(cfg.text, cross_width=vw)
        self.vision_proj = nn.Linear(vw, d)
        self.text_proj = nn.Linear(th, d)
        self.itm_head = nn.Linear(th, 2)
        # Shape [1], not a 0-dim scalar: DeepSpeed's broadcast views parameters as bytes and fails on 0-dim.
        self.temp = nn.Parameter(torch.full((1,), cfg.temp))

        for online, mom in MOMENTUM_PAIRS:
            setattr(self, mom, params_to_buffers(copy.deepcopy(getattr(self, online))))

        # Queues as (Q, D) rows (the released checkpoints store (D, Q); the loader transposes).
        gen = torch.Generator().manual_seed(cfg.queue_seed)
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.queue_size, d, generator=gen), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.queue_size, d, generator=gen), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # Execution choices, not model state (`albef-ds bench throughput` sets them):
        # recipe "reference" reruns the reference implementation's choices with the same model: a per-tensor
        # EMA loop, hard negatives drawn row by row with torch.multinomial, the MLM vocabulary head over
        # every position, the unfused ITC. timer: an object whose section(name) context manager times the
        # parts of a step (None: no timing).
        self.recipe = "ours"
        self.timer = None

    # ------------------------------------------------------------------ momentum
    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(momentum buffers, online parameters), paired by name, each tensor once."""
        moms, onlines = [], []
        for online, mom in MOMENTUM_PAIRS:
            params = dict(getattr(self, online).named_parameters())
            bufs = dict(getattr(self, mom).named_buffers())
            if params.keys() != bufs.keys():
                raise RuntimeError(f"{mom} does not mirror {online}: {sorted(params.keys() ^ bufs.keys())}")
            for name, p in params.items():
                moms.append(bufs[name])
                onlines.append(p)
        return moms, onlines

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum := online (at start-up, after loading pretrained weights)."""
        moms, onlines = self.momentum_pairs()
        for pm, p in zip(moms, onlines):
            pm.copy_(p.detach().to(pm.dtype))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """One EMA step over every momentum tensor; call once per optimizer step, before the forward."""
        moms, onlines = self.momentum_pairs()
        if self.recipe == "reference":
            m = self.cfg.momentum
            for pm, p in zip(moms, onlines):  # one small kernel sequence per tensor, as the reference does
                pm.copy_(pm * m + p.detach().to(pm.dtype) * (1.0 - m))
            return
        kernels.ema_update(moms, onlines, self.cfg.momentum)

    def _section(self, name: str):
        return self.timer.section(name) if self.timer is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ queue
    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        """Gather the momentum features of the global batch (one collective) and write them into the ring.

        Works for any global batch G and queue size Q: slots (ptr + i) mod Q; if G > Q only the newest Q
        features are kept. The pointer stays on the device, and when the gather marks padded rows
        (ranks that dropped undecodable images) they are left out without a host sync as long as G <= Q.
        """
        q = self.image_queue.shape[0]
        if q == 0:
            return
        d = image_feat_m.shape[1]
        packed = torch.cat([image_feat_m, text_feat_m], dim=1).to(self.image_queue.dtype)  # (B, 2D)
        gathered = self.all_gather(packed)  # (G, 2D) or ((G, 2D), valid)
        valid = None
        if isinstance(gathered, tuple):
            gathered, valid = gathered
        g = gathered.shape[0]
        if valid is not None and g <= q:
            self._enqueue_masked(gathered, valid, d)
            return
        if valid is not None:  # more rows than slots: select the real ones (a host sync; rare)
            gathered = gathered[valid]
            g = gathered.shape[0]
        skip = max(0, g - q)  # entries that the newer ones would overwrite within this same write
        gathered = gathered[skip:]
        slots = (self.queue_ptr + skip + torch.arange(g - skip, device=gathered.device)) % q
        self.image_queue.index_copy_(0, slots, gathered[:, :d])
        self.text_queue.index_copy_(0, slots, gathered[:, d:])
        self.queue_ptr.copy_((self.queue_ptr + g) % q)

    def _enqueue_masked(self, rows: torch.Tensor, valid: torch.Tensor, d: int) -> None:
        """Write the valid rows (in order) at ptr, ptr+1, ...: every row gets a distinct slot (G <= Q); the
        padded ones, moved to the end, write back what their slot already holds."""
        q = self.image_queue.shape[0]
        g = rows.shape[0]
        order = torch.sort((~valid).to(torch.uint8), stable=True).indices  # valid rows first, in order
        rows = rows[order]
        n = valid.sum()
        idx = torch.arange(g, device=rows.device)
        slots = (self.queue_ptr + idx) % q
        keep = (idx < n)[:, None]
        self.image_queue.index_copy_(0, slots, torch.where(keep, rows[:, :d], self.image_queue[slots]))
        self.text_queue.index_copy_(0, slots, torch.where(keep, rows[:, d:], self.text_queue[slots]))
        self.queue_ptr.copy_((self.queue_ptr + n) % q)

    # ------------------------------------------------------------------ encoders
    def clamped_temp(self) -> torch.Tensor:
        """Temperature clamped to [temp_min, temp_max], out of place, with a straight-through gradient.

        The reference clamps the parameter in place before each forward, so its gradient always flows; an
        in-place clamp here would only touch a low-precision copy under DeepSpeed, and a plain out-of-place
        clamp would freeze a temperature that left the range. Value: clamped; gradient: identity.
        """
        t = self.temp
        return t + (t.clamp(self.cfg.temp_min, self.cfg.temp_max) - t).detach()

    def encode_image(
        self, image: torch.Tensor, *, momentum: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (tokens (B, 1+N, W), unit feature (B, D))."""
        enc, proj = (
            (self.visual_encoder_m, self.vision_proj_m)
            if momentum
            else (self.visual_encoder, self.vision_proj)
        )
        embeds = enc.forward_features(image)
        return embeds, F.normalize(proj(embeds[:, 0]), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, momentum: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) -> (states (B, L, H), unit feature (B, D))."""
        enc, proj = (
            (self.text_encoder_m, self.text_proj_m) if momentum else (self.text_encoder, self.text_proj)
        )
        states = enc.bert.encode_text(input_ids, attention_mask)
        return states, F.normalize(proj(states[:, 0]), dim=-1)

    def _momentum_precision(self, image: torch.Tensor):
        """The momentum encoders keep fp32 weights (buffers: a bf16 EMA would lose most updates) while a
        bf16/fp16 engine feeds low-precision inputs: their forward then runs under autocast in the input's
        dtype (low-precision matmuls on fp32 weights), as fast as the online pass."""
        low = image.dtype in (torch.bfloat16, torch.float16)
        if low and self.image_queue.dtype == torch.float32:
            return torch.autocast(device_type=image.device.type, dtype=image.dtype)
        return contextlib.nullcontext()

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
        ref = self.recipe == "reference"

        with self._section("online_forward"):
            image_embeds, image_feat = self.encode_image(image)
            text_embeds, text_feat = self.encode_text(input_ids, attention_mask)

        with torch.no_grad(), self._momentum_precision(image), self._section("momentum_forward"):
            image_embeds_m, image_feat_m = self.encode_image(image, momentum=True)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)
            image_bank = torch.cat([image_feat_m.to(self.image_queue.dtype), self.image_queue], dim=0)
            text_bank = torch.cat([text_feat_m.to(self.text_queue.dtype), self.text_queue], dim=0)

        # ---- ITC with momentum distillation over [batch; queue]
        with self._section("itc"):
            itc = kernels.itc_loss_reference if ref else kernels.itc_loss
            loss_itc = itc(
                image_feat, text_feat, image_feat_m, text_feat_m, image_bank, text_bank, temp, alpha
            )

        # ---- ITM with in-batch hard negatives (weights = softmax of the in-batch ITC similarities)
        with self._section("itm"):
            with torch.no_grad():
                t = temp.detach().float()
                sim_i2t = image_feat.float() @ text_feat_m.float().t() / t  # (B, B)
                sim_t2i = text_feat.float() @ image_feat_m.float().t() / t
                draw = sample_hard_negatives_looped if ref else sample_hard_negatives
                neg_image = draw(sim_t2i)  # a negative image for each text
                neg_text = draw(sim_i2t)  # a negative text for each image
            # 3B pairs in one fusion pass: [positives; (text, negative image); (negative text, image)]
            text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], dim=0)
            mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]], dim=0)
            image_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)
            fused_cls = self.text_encoder.bert.fuse(text_all, mask_all, image_all)[:, 0]
            loss_itm = itm_loss(self.itm_head(fused_cls), b)

        with self._section("mlm"):
            loss_mlm = self._mlm(input_ids, attention_mask, image, image_embeds, image_embeds_m, alpha, ref)

        w_itc, w_itm, w_mlm = self.loss_weights
        loss = w_itc * loss_itc + w_itm * loss_itm + w_mlm * loss_mlm
        return PretrainOutput(loss, loss_itc, loss_itm, loss_mlm, image_feat_m, text_feat_m)

    def _mlm(self, input_ids, attention_mask, image, image_embeds, image_embeds_m, alpha, ref: bool):
        """MLM with momentum distillation; the vocabulary head runs on the masked positions only (on all of
        them in the reference recipe)."""
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
        if ref:
            logits = self.text_encoder.cls(states.flatten(0, 1))  # (B x L, V)
            with torch.no_grad(), self._momentum_precision(image):
                soft = F.softmax(self.text_encoder_m.cls(states_m.flatten(0, 1)).float(), dim=-1)
            return kernels.mlm_loss_reference(logits, labels.flatten(), soft, alpha)
        index, sel_labels = select_scored_positions(
            labels, mlm_capacity(labels.numel(), self.cfg.mlm_probability)
        )
        logits = self.text_encoder.cls(states.flatten(0, 1).index_select(0, index))  # (K, V)
        with torch.no_grad(), self._momentum_precision(image):
            logits_m = self.text_encoder_m.cls(states_m.flatten(0, 1).index_select(0, index))
            soft = F.softmax(logits_m.float(), dim=-1)
        return kernels.mlm_loss(logits, sel_labels, soft, alpha)
