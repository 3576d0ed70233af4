"""BERT text encoder (layers [0, fusion_layer)) and fusion encoder (the rest, with cross-attention).

Our own blocks on `F.scaled_dot_product_attention`. Module names follow HF's BertForMaskedLM so that
state-dict keys line up with bert-base-uncased and with the released ALBEF checkpoints:

    bert.embeddings.{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm}
    bert.encoder.layer.N.attention.self.{query,key,value}
    bert.encoder.layer.N.attention.output.{dense,LayerNorm}
    bert.encoder.layer.N.crossattention.self.{query,key,value}  (fusion layers only; random init)
    bert.encoder.layer.N.crossattention.output.{dense,LayerNorm}
    bert.encoder.layer.N.intermediate.dense                  bert.encoder.layer.N.output.{dense,LayerNorm}
    cls.predictions.transform.{dense,LayerNorm}  cls.predictions.decoder.weight (tied)  cls.predictions.bias
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .attention import KeptAttention, attention_with_probs


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: (B, L) -> (B, L, H); a single segment (token type 0), as ALBEF uses.
        length = input_ids.shape[1]
        pos = torch.arange(length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _QKV(nn.Module):
    """Query/key/value projections (named `self` in BERT's state dict)."""

    def __init__(self, hidden: int, kv_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class _ResidualOutput(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm (BERT's post-LN sub-layer output, `*.output.*` keys)."""

    def __init__(self, cfg: TextConfig, in_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    """Post-LN multi-head attention block; self-attention when kv is None, else cross-attention.

    `kept` is None (SDPA) except inside `attention.keep_attention(this module)`, which makes the block compute
    its attention explicitly and hand back the probabilities (Grad-CAM)."""

    def __init__(self, cfg: TextConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.attn_dropout = cfg.dropout
        self.kept: KeptAttention | None = None
        # `self` is a valid attribute name in Python; it keeps BERT's key `attention.self.query.weight`.
        setattr(self, "self", _QKV(cfg.hidden, kv_width or cfg.hidden))  # noqa: B010
        self.output = _ResidualOutput(cfg, cfg.hidden)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x: (B, L, H); kv: (B, N, W) for cross-attention; mask: bool (B, 1, 1, Lk), True = attend.
        proj = self.self
        src = x if kv is None else kv
        b, lq, h = x.shape
        lk = src.shape[1]
        d = h // self.heads
        q = proj.query(x).view(b, lq, self.heads, d).transpose(1, 2)  # (B, nh, Lq, d)
        k = proj.key(src).view(b, lk, self.heads, d).transpose(1, 2)  # (B, nh, Lk, d)
        v = proj.value(src).view(b, lk, self.heads, d).transpose(1, 2)
        p = self.attn_dropout if self.training else 0.0
        if self.kept is None:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:  # keep_attention(self) is open: explicit softmax, probabilities (B, nh, Lq, Lk) kept
            ctx, self.kept.probs = attention_with_probs(q, k, v, mask, dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(b, lq, h)
        return self.output(ctx, x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int | None) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.has_cross_attention = cross_width is not None
        if cross_width is not None:
            self.crossattention = BertAttention(cfg, kv_width=cross_width)
        self.intermediate = _Intermediate(cfg)
        self.output = _ResidualOutput(cfg, cfg.intermediate)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.attention(x, mask)
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("a fusion layer needs image_embeds")
            x = self.crossattention(x, image_mask, kv=image_embeds)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(cfg, cross_width if i >= cfg.fusion_layer else None) for i in range(cfg.layers)
        )


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    # (B, L) 0/1 -> bool (B, 1, 1, L) for SDPA (True = attend); None = attend everywhere.
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


class BertModel(nn.Module):
    """Embeddings + text layers + fusion layers. `encode_text` and `fuse` run the two halves."""

    def __init__(self, cfg: TextConfig, *, cross_width: int) -> None:
        super().__init__()
        self.fusion_layer = cfg.fusion_layer
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = _Encoder(cfg, cross_width)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, H) unimodal text states (layers [0, fusion_layer))."""
        x = self.embeddings(input_ids)
        mask = _key_mask(attention_mask)
        for layer in self.encoder.layer[: self.fusion_layer]:
            x = layer(x, mask)
        return x

    def fuse(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, H) text states + (B, N, W) image tokens -> (B, L, H) multimodal states."""
        mask = _key_mask(attention_mask)
        img_mask = _key_mask(image_mask)
        x = text_states
        for layer in self.encoder.layer[self.fusion_layer :]:
            x = layer(x, mask, image_embeds, img_mask)
        return x

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        return self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, image_embeds)

    def decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        states: torch.Tensor,
        states_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Causal decoder pass (VQA's answer decoder: every layer cross-attends, fusion_layer = 0):
        (B, L) ids -> (B, L, H); position t sees positions <= t that are not padding, and every layer
        cross-attends to `states` (B, N, W) where `states_mask` (B, N) is 1."""
        x = self.embeddings(input_ids)
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        # (B, 1, L, L): causal and not padding. Position 0 ([CLS]) is never padding, so no row is empty.
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        cross = _key_mask(states_mask)
        for layer in self.encoder.layer:
            x = layer(x, mask, states, cross)
        return x


class _PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class _LMPrediction(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.transform = _PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)  # weight tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class MLMHead(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.predictions = _LMPrediction(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, H) states at the scored positions -> (K, V) vocabulary logits."""
        return self.predictions(x)


class BertMLM(nn.Module):
    """The text + fusion encoder with its MLM head (`text_encoder` in ALBEF's state dict)."""

    def __init__(self, cfg: TextConfig, *, cross_width: int) -> None:
        super().__init__()
        self.bert = BertModel(cfg, cross_width=cross_width)
        self.cls = MLMHead(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.apply(functools.partial(_init_bert_weights, std=cfg.init_std))

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


def _init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    # BERT's initialisation: N(0, std) for linear and embedding weights (BERT: 0.02 = initializer_range),
    # zero biases, unit LayerNorm.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
