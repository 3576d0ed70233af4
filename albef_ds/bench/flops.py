"""Analytic FLOPs of one ALBEF pre-training step, per component, for any model config.

Conventions (the usual ones for MFU): only matrix products count (linear layers, attention score and
context products, convolutions, the ITC similarities), at 2 FLOPs per multiply-accumulate; embedding
lookups, norms, softmax and element-wise work are left out. Backward costs twice the forward for layers
whose input and weight both need gradients, and once the forward where only one side does (the patch
embedding: the image needs no gradient; the ITC similarities: the candidate bank carries none). The momentum
model and all target computations run forward only.

What one step computes for a batch of B pairs with L text tokens and a queue of Q entries (our recipe):
    online:   ViT (B); text encoder (B); ITM fusion over 3B pairs (positives, negative image, negative text)
              + ITM head; MLM: the whole BERT (text + fusion layers) on the masked text (B) + the vocabulary
              head on the K masked positions (K = mlm_capacity(B x L)); ITC similarities (2 directions x B x
              (B + Q) x D) and the in-batch similarities for the hard negatives.
    momentum: ViT_m (B); text encoder_m (B); the whole BERT_m on the masked text (B) + the head on K;
              the momentum ITC similarities.
The reference recipe runs the MLM vocabulary head on every one of the B x L positions (online and momentum);
`mlm_head_positions="all"` counts that.

Patch dropout (`model.vision.patch_dropout` p > 0) shortens the online image sequence from 1 + N to 1 + K
tokens (K = `kept_patches(N, p)`): the online ViT blocks, the ITM fusion's and the online MLM's
cross-attention run on 1 + K image tokens; the patch embedding still runs on all N patches. The momentum ViT
and BERT_m see all N patches unless `model.vision.patch_dropout_momentum`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..model.losses import mlm_capacity
from ..model.vit import kept_patches


@dataclass
class Flops:
    """FLOPs of one optimizer step (one micro-batch of `batch` pairs), by component and direction."""

    vit: float = 0.0  # online ViT, forward + backward
    text: float = 0.0  # online text encoder (the ITC pass), forward + backward
    fusion_itm: float = 0.0  # ITM: fusion layers over 3B pairs + head, forward + backward
    mlm: float = 0.0  # online MLM: full BERT + vocabulary head, forward + backward
    itc: float = 0.0  # online ITC similarities (forward + backward) and the target/negative similarities
    momentum: float = 0.0  # momentum ViT, text encoder, BERT + head for MLM targets (forward only)

    @property
    def total(self) -> float:
        return self.vit + self.text + self.fusion_itm + self.mlm + self.itc + self.momentum

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def image_tokens(cfg: ModelConfig, *, momentum: bool = False) -> int:
    """Tokens ([CLS] + patches) of one image in the online (or momentum) ViT of a pre-training step, after
    patch dropout."""
    v = cfg.vision
    n = (v.image_size // v.patch_size) ** 2
    if v.patch_dropout > 0 and (not momentum or v.patch_dropout_momentum):
        return 1 + kept_patches(n, v.patch_dropout)
    return 1 + n


def _vit_forward(cfg: ModelConfig, tokens: int) -> tuple[float, float]:
    """(patch-embedding MACs over every patch, transformer + projection MACs over `tokens`) for one image."""
    v = cfg.vision
    n = (v.image_size // v.patch_size) ** 2
    t = tokens
    w = v.width
    hidden = int(w * v.mlp_ratio)
    patch = n * 3 * v.patch_size * v.patch_size * w
    block = t * w * 3 * w + 2 * t * t * w + t * w * w + 2 * t * w * hidden
    return float(patch), float(v.depth * block + w * cfg.embed_dim)


def _text_layer(h: int, inter: int, length: int) -> float:
    """MACs of one BERT self-attention layer over `length` tokens."""
    return float(4 * length * h * h + 2 * length * length * h + 2 * length * h * inter)


def _cross(h: int, kv_width: int, length: int, image_tokens: int) -> float:
    """MACs of one cross-attention block: query and output projections of the text, key/value projections
    of the image tokens, scores and context."""
    return float(2 * length * h * h + 2 * image_tokens * kv_width * h + 2 * length * image_tokens * h)


def step_flops(cfg: ModelConfig, batch: int, text_len: int, *, mlm_head_positions: str = "masked") -> Flops:
    """FLOPs of one training step of `batch` pairs whose text is `text_len` tokens long.

    mlm_head_positions: "masked" (ours: the head on mlm_capacity(batch x text_len) rows) or "all" (the
    reference: every position). Patch dropout is read from cfg.vision (see the module docstring).
    """
    if mlm_head_positions not in ("masked", "all"):
        raise ValueError(f"mlm_head_positions must be 'masked' or 'all', got {mlm_head_positions!r}")
    t = cfg.text
    b, length = batch, text_len
    tok, tok_m = image_tokens(cfg), image_tokens(cfg, momentum=True)
    h, inter, d = t.hidden, t.intermediate, cfg.embed_dim
    n_text, n_fusion = t.fusion_layer, t.layers - t.fusion_layer

    patch, vit_rest = _vit_forward(cfg, tok)
    _, vit_rest_m = _vit_forward(cfg, tok_m)
    text_enc = n_text * _text_layer(h, inter, length) + h * d  # + the [CLS] projection

    def fusion_layers(image_tokens: int) -> float:
        return n_fusion * (_text_layer(h, inter, length) + _cross(h, cfg.vision.width, length, image_tokens))

    fusion, fusion_m = fusion_layers(tok), fusion_layers(tok_m)
    bert_full = n_text * _text_layer(h, inter, length) + fusion
    bert_full_m = n_text * _text_layer(h, inter, length) + fusion_m
    rows = mlm_capacity(b * length, cfg.mlm_probability) if mlm_head_positions == "masked" else b * length
    head = rows * (h * h + h * t.vocab_size)  # MACs for the whole batch
    q = cfg.queue_size

    f = Flops()
    mac = 2.0  # FLOPs per multiply-accumulate
    f.vit = mac * b * (patch * 2 + vit_rest * 3)  # patch embedding: forward + weight gradient only
    f.text = mac * b * text_enc * 3
    f.fusion_itm = mac * (3 * b * fusion + 3 * b * h * 2) * 3
    f.mlm = mac * (b * bert_full + head) * 3
    itc_online = 2 * b * (b + q) * d  # two directions
    f.itc = mac * (itc_online * 2 + itc_online + 2 * b * b * d)  # online fwd+bwd(feat), targets, negatives
    f.momentum = mac * (b * (patch + vit_rest_m) + b * text_enc + b * bert_full_m + head)
    return f
