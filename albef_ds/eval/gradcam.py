"""Grad-CAM maps for weakly-supervised grounding (RefCOCO+), on the bare module.

Two variants (DOWNSTREAM_SPEC.md section 4), both returning one (g, g) map per (image, expression) pair on
the ViT's patch grid (24 x 24 at 384 px):

- `itm_gradcam` (the reported variant): the cross-attention probabilities A (B, heads, L, 1+N) of one
  fusion layer and G = d s / d A, s = sum over the batch of the raw positive ITM logit. Map = mean over
  heads, then over the valid text rows (the text [CLS] row included, padding rows left out), of
  A * clamp(G, min=0), the image [CLS] column dropped. The reference divides by all L rows, padding
  included: that scales each expression's map by a constant and never changes which box it picks.
- `itc_gradcam`: a ViT block's self-attention, the image [CLS]-query row (the [CLS] key column dropped),
  G = d s / d A with s = sum of diag(sim) of the unit image / text features, the same clamped product
  averaged over heads. The reference's sim is divided by the temperature: a positive constant, which only
  scales the map.

Default layers (`default_fusion_layer`, `default_vit_block`): ALBEF's, the third of six fusion layers
(index 8 of ALBEF-base: fusion_layer 6 + 6 // 3), in general fusion_layer + (fusion layers) // 3, the same
relative depth (the first fusion layer of the debug model's two: measured on the demo's pre-trained model,
synthetic val split, 40.5% there against 19.0% on its last fusion layer); and ViT block 8, or the last
block of a ViT with fewer than nine.

Both run with gradients on (also when called under torch.no_grad), take the gradient with autograd.grad
(parameter .grad stays untouched), run the model in eval mode (no dropout) and put every submodule back in
the train/eval mode it was found in. Pass the bare module (a DeepSpeed engine's `.module`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import default_gradcam_fusion_layer
from ..model.attention import keep_attention

ITC_VIT_BLOCK = 8  # the reference's default ViT block for the ITC variant (which one the paper used: [U])


def default_fusion_layer(fusion_layer: int, num_layers: int) -> int:
    """Absolute index of the ITM Grad-CAM layer (`config.default_gradcam_fusion_layer`): ALBEF's place, a
    third of the way into the fusion layers (8 for ALBEF-base's 6..11; the first fusion layer of a model
    with two)."""
    return default_gradcam_fusion_layer(fusion_layer, num_layers)


def default_vit_block(depth: int) -> int:
    """Index of the ITC Grad-CAM block: 8, or the last block when the ViT has fewer than nine."""
    if depth < 1:
        raise ValueError("the ViT has no blocks")
    return min(ITC_VIT_BLOCK, depth - 1)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Every submodule back in its own mode afterwards (a model may be found with mixed modes).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _bert(model: nn.Module) -> nn.Module:
    if not hasattr(model, "visual_encoder") and hasattr(model, "module"):
        raise TypeError("pass the bare module (a DeepSpeed engine's `.module`), not the engine")
    te = model.text_encoder
    bert = te.bert if hasattr(te, "bert") else te
    if not hasattr(bert, "fuse"):
        raise TypeError(f"text_encoder must be a BertModel or hold one as .bert, got {type(te).__name__}")
    return bert


def _check_inputs(image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)}"
            " must both be (B, L)"
        )
    if image.shape[0] != input_ids.shape[0]:
        raise ValueError(f"{image.shape[0]} images but {input_ids.shape[0]} texts")
    if (attention_mask.sum(1) == 0).any():
        raise ValueError("every text needs at least one valid token ([CLS])")


def _image_input(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    return image.to(next(model.visual_encoder.parameters()).dtype)


def _to_grid(cam: torch.Tensor) -> torch.Tensor:
    """(B, N) patch scores -> (B, g, g), row-major as the ViT's patch tokens."""
    g = math.isqrt(cam.shape[1])
    if g * g != cam.shape[1]:
        raise ValueError(f"{cam.shape[1]} patch tokens do not form a square grid")
    return cam.reshape(cam.shape[0], g, g)


def itm_gradcam(
    model: nn.Module,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    layer: int | None = None,
) -> torch.Tensor:
    """ITM Grad-CAM (see the module docstring): (B, 3, S, S), (B, L), (B, L) -> (B, g, g) fp32, detached.

    model: a retrieval-style ALBEF module (`visual_encoder`, `text_encoder` = BertModel or BertMLM with
    `.bert`, `itm_head`); layer: absolute index of a fusion layer (default `default_fusion_layer`)."""
    bert = _bert(model)
    _check_inputs(image, input_ids, attention_mask)
    n_layers, first = len(bert.encoder.layer), bert.fusion_layer
    layer = default_fusion_layer(first, n_layers) if layer is None else layer
    if not first <= layer < n_layers:
        raise ValueError(f"layer {layer} is not a fusion layer: fusion layers are {first}..{n_layers - 1}")
    prefix = getattr(model.visual_encoder, "num_prefix_tokens", 1)
    with _eval_mode(model), torch.enable_grad():
        with keep_attention(bert.encoder.layer[layer].crossattention) as kept:
            image_embeds = model.visual_encoder.forward_features(_image_input(model, image))  # (B, 1+N, W)
            fused = bert(input_ids, attention_mask, image_embeds)  # (B, L, H)
            score = model.itm_head(fused[:, 0])[:, 1].float().sum()  # raw positive ITM logits
        probs = kept.probs  # (B, heads, L, 1+N)
        (grad,) = torch.autograd.grad(score, probs)
    cam = probs.detach()[..., prefix:] * grad[..., prefix:].clamp(min=0)  # (B, heads, L, N)
    cam = cam.mean(1)  # (B, L, N)
    valid = attention_mask.to(cam)  # (B, L): padding rows weigh 0
    cam = (cam * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)  # (B, N): mean over valid rows
    return _to_grid(cam)


def itc_gradcam(
    model: nn.Module,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """ITC Grad-CAM (see the module docstring): (B, 3, S, S), (B, L), (B, L) -> (B, g, g) fp32, detached.

    model: an ALBEF module with `visual_encoder` (timm ViT), `vision_proj`, `text_encoder`, `text_proj`;
    block: ViT block index (default `default_vit_block`)."""
    bert = _bert(model)
    _check_inputs(image, input_ids, attention_mask)
    vit = model.visual_encoder
    depth = len(vit.blocks)
    block = default_vit_block(depth) if block is None else block
    if not 0 <= block < depth:
        raise ValueError(f"block {block} is out of range: the ViT has blocks 0..{depth - 1}")
    prefix = getattr(vit, "num_prefix_tokens", 1)
    with _eval_mode(model), torch.enable_grad():
        with torch.no_grad():  # the text side does not depend on A
            text_feat = F.normalize(
                model.text_proj(bert.encode_text(input_ids, attention_mask)[:, 0]).float(), dim=-1
            )
        with keep_attention(vit.blocks[block].attn) as kept:
            image_embeds = vit.forward_features(_image_input(model, image))  # (B, 1+N, W)
            image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]).float(), dim=-1)  # (B, D)
            score = (image_feat * text_feat).sum()  # sum of diag(image_feat @ text_feat^T)
        probs = kept.probs  # (B, heads, 1+N, 1+N)
        (grad,) = torch.autograd.grad(score, probs)
    cam = probs.detach()[:, :, 0, prefix:] * grad[:, :, 0, prefix:].clamp(min=0)  # (B, heads, N)
    return _to_grid(cam.mean(1))
