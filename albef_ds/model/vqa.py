"""ALBEF for VQA: the encoders over (image, question) and a generative answer decoder, with momentum
distillation, answer-list ranking at inference.

Parts (state-dict names are the reference's, with our `text_encoder.bert.*` for the encoder):

    visual_encoder.*            ViT
    text_encoder.bert.*         the text + fusion BERT over the question and the image (no MLM head)
    text_decoder.bert.*         the answer decoder: embeddings + (layers - fusion_layer) layers, each with
                                causal self-attention and cross-attention to the encoder's question states
    text_decoder.cls.*          its LM head, tied to the decoder's word embeddings
    *_m                         momentum copies of the three (buffers, EMA 0.995)

A pre-trained checkpoint initialises the decoder from the encoder's fusion layers (6-11 -> 0-5 for
ALBEF-base), its embeddings and its MLM head (`model.weights` holds that key map); nothing is shared between
encoder and decoder afterwards.

Loss of a batch (B questions, N answers in all, `answer_count[b]` of them for question b):

    l_a  = sum over the answer's tokens t >= 1 of (1 - alpha) * NLL(token_t) + alpha * soft-CE(teacher_t)
    loss = sum_a w_a * l_a / B

where the teacher's distribution at each position comes from the momentum ViT, encoder and decoder, and the
encoder states are repeated once per answer on the device (`repeat_interleave`). The reference dropped
alpha on the way to the decoder until July 2022, so its distillation term was off; here alpha is used.

Inference (`rank_answers`): the decoder reads [CLS] alone; the probability of each answer's first token
picks the top-k answers of a fixed list; each candidate is re-scored by its teacher-forced sequence
log-likelihood (the sum over its tokens, the first included), and the best is the prediction. The
reference adds log p(first token) once more (it is already in the sum): `double_count=True` reproduces it.

Single-device code; the trainer calls `momentum_update()` before `forward()` each optimizer step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .bert import BertMLM
from .encoders import build_text_encoder
from .momentum import MomentumModel, MomentumPairs, momentum_autocast
from .vit import build_vit

VQA_MOMENTUM_NAMES = ("visual_encoder", "text_encoder", "text_decoder")


def decoder_layers(cfg: ModelConfig) -> int:
    """The answer decoder's depth: one layer per fusion layer of the encoder (6 for ALBEF-base)."""
    return cfg.text.layers - cfg.text.fusion_layer


def build_answer_decoder(cfg: ModelConfig) -> BertMLM:
    """Embeddings + decoder_layers(cfg) BERT layers that all cross-attend (to question states of the text
    width), and an LM head tied to the word embeddings."""
    dec_cfg = dataclasses.replace(cfg.text, layers=decoder_layers(cfg), fusion_layer=0)
    return BertMLM(dec_cfg, cross_width=cfg.text.hidden)


def answer_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    soft: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-sequence summed token loss.

    logits (N, T, V) predict targets (N, T) where mask (N, T) is 1; soft (N, T, V): the teacher's
    probabilities at the same positions, mixed in with weight alpha. Returns (N,) fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)  # (N, T)
    if soft is not None and alpha > 0:
        tok = (1.0 - alpha) * nll - alpha * (soft.float() * logp).sum(-1)
    else:
        tok = nll
    return (tok * mask.to(tok.dtype)).sum(1)


@dataclass
class VQAOutput:
    loss: torch.Tensor  # scalar: sum_a w_a * l_a / B
    answer_loss: torch.Tensor  # (N,) per-answer loss l_a (before weighting)


class ALBEFVQA(MomentumModel, nn.Module):
    """The VQA module (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, special_tokens: dict[str, int]) -> None:
        """special_tokens: ids of 'pad' and 'cls' (from the tokenizer; [CLS] starts every answer)."""
        super().__init__()
        missing = {"pad", "cls"} - set(special_tokens)
        if missing:
            raise ValueError(f"special_tokens lacks {sorted(missing)}")
        if cfg.text.hidden != cfg.vision.width:
            # The decoder's cross-attention (over text states) is initialised from the fusion layers'
            # (over image tokens): their key/value projections must have the same input width.
            raise ValueError(
                f"VQA needs model.text.hidden ({cfg.text.hidden}) == model.vision.width "
                f"({cfg.vision.width}): the decoder's cross-attention starts from the fusion layers'"
            )
        self.cfg = cfg
        self.special_tokens = dict(special_tokens)
        self.visual_encoder = build_vit(cfg.vision)
        self.text_encoder = build_text_encoder(cfg, mlm_head=False)
        self.text_decoder = build_answer_decoder(cfg)
        self.momentum = MomentumPairs(self, VQA_MOMENTUM_NAMES, cfg.momentum)

    # ------------------------------------------------------------------ parts
    def encode_question(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        momentum: bool = False,
    ) -> torch.Tensor:
        """(B, 3, S, S) images + (B, Lq) questions -> (B, Lq, H) multimodal question states."""
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        enc = self.text_encoder_m if momentum else self.text_encoder
        return enc.bert(input_ids, attention_mask, vit.forward_features(image))

    def decoder_logits(
        self,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        states: torch.Tensor,
        states_mask: torch.Tensor,
        *,
        momentum: bool = False,
    ) -> torch.Tensor:
        """(N, La) answer tokens over (N, Lq, H) question states -> (N, La, V) next-token logits."""
        dec = self.text_decoder_m if momentum else self.text_decoder
        return dec.cls(dec.bert.decode(answer_ids, answer_mask, states, states_mask))

    # ------------------------------------------------------------------ training
    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        answer_weight: torch.Tensor,
        answer_count: torch.Tensor,
        *,
        alpha: float,
    ) -> VQAOutput:
        """The loss of one batch (module docstring); answer_count (B,) long: answers of each question, in
        order, summing to N. Does not update the momentum model."""
        b, n = image.shape[0], answer_ids.shape[0]
        states = self.encode_question(image, input_ids, attention_mask)  # (B, Lq, H)
        # Encoder states once per answer, on the device; output_size avoids a host sync.
        per_answer = answer_count.to(states.device)
        rep_states = states.repeat_interleave(per_answer, dim=0, output_size=n)  # (N, Lq, H)
        rep_mask = attention_mask.repeat_interleave(per_answer, dim=0, output_size=n)  # (N, Lq)
        logits = self.decoder_logits(answer_ids, answer_mask, rep_states, rep_mask)[:, :-1]  # (N, La-1, V)
        soft = None
        if alpha > 0:
            with torch.no_grad(), momentum_autocast(image, self.momentum_dtype()):
                states_m = self.encode_question(image, input_ids, attention_mask, momentum=True)
                rep_m = states_m.repeat_interleave(per_answer, dim=0, output_size=n)
                logits_m = self.decoder_logits(answer_ids, answer_mask, rep_m, rep_mask, momentum=True)
                soft = F.softmax(logits_m[:, :-1].float(), dim=-1)  # (N, La-1, V)
        # Position t predicts token t+1; padding (mask 0) is not predicted.
        loss_a = answer_token_loss(logits, answer_ids[:, 1:], answer_mask[:, 1:], soft, alpha)  # (N,)
        loss = (answer_weight.to(loss_a.dtype) * loss_a).sum() / max(b, 1)
        return VQAOutput(loss, loss_a.detach())

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def rank_answers(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        *,
        k: int,
        double_count: bool = False,
        chunk: int = 2048,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best answer of a fixed list for each of B questions: (answer indices (B,), scores (B,)).

        answer_ids / answer_mask (A, La): every answer as [CLS] pieces [SEP]. First-token probabilities on
        [CLS] keep the top-k answers; their teacher-forced log-likelihoods (summed over tokens) pick the
        best (plus log p(first token) once more with double_count, the reference's score). Candidates are
        scored `chunk` sequences per decoder pass."""
        b, a = input_ids.shape[0], answer_ids.shape[0]
        k = min(k, a)
        states = self.encode_question(image, input_ids, attention_mask)  # (B, Lq, H)
        start = torch.full((b, 1), self.special_tokens["cls"], dtype=torch.long, device=states.device)
        first = self.decoder_logits(start, torch.ones_like(start), states, attention_mask)[:, 0]  # (B, V)
        first_p = F.softmax(first.float(), dim=-1).index_select(1, answer_ids[:, 1])  # (B, A)
        top_p, top_i = first_p.topk(k, dim=1)  # (B, k)
        cand_ids = answer_ids[top_i.reshape(-1)]  # (B*k, La)
        cand_mask = answer_mask[top_i.reshape(-1)]
        q_states = states.repeat_interleave(k, dim=0)  # (B*k, Lq, H)
        q_mask = attention_mask.repeat_interleave(k, dim=0)
        ll = torch.empty(b * k, dtype=torch.float32, device=states.device)
        for s in range(0, b * k, chunk):
            e = min(s + chunk, b * k)
            logits = self.decoder_logits(cand_ids[s:e], cand_mask[s:e], q_states[s:e], q_mask[s:e])
            ll[s:e] = -answer_token_loss(logits[:, :-1], cand_ids[s:e, 1:], cand_mask[s:e, 1:])
        scores = ll.view(b, k)
        if double_count:
            scores = scores + top_p.clamp_min(1e-30).log()
        best_score, best = scores.max(dim=1)
        return top_i.gather(1, best[:, None]).squeeze(1), best_score
