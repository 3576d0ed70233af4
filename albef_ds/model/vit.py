"""ViT-B/16 image encoder (timm) with position-embedding resampling to any resolution, and the forward with
FLIP-style patch dropout (a random subset of the patch tokens enters the transformer blocks)."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..config import VisionConfig


def build_vit(cfg: VisionConfig) -> VisionTransformer:
    """A timm VisionTransformer without a classifier head; `forward_features` returns all tokens.

    State-dict keys are timm's (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`),
    which are also the DeiT checkpoints' and the released ALBEF checkpoints' `visual_encoder.*` keys.
    """
    vit = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=cfg.drop_path,
    )
    if cfg.pos_embed_init == "sincos":
        with torch.no_grad():
            grid = cfg.image_size // cfg.patch_size
            vit.pos_embed[0, vit.num_prefix_tokens :] = sincos_pos_embed(grid, cfg.width)
    return vit


def sincos_pos_embed(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) 2-D sine-cosine position embeddings in raster order: channels [0, width/2)
    encode the row, [width/2, width) the column; each half is sin(p * w_k) then cos(p * w_k) for the
    width/4 frequencies w_k = 10000^(-k / (width/4)). Values in [-1, 1], on the scale of the patch
    embeddings from the first step (a std 0.02 start is drowned by them)."""
    if width % 4:
        raise ValueError(f"2-D sine-cosine position embeddings need a width divisible by 4, got {width}")
    quarter = width // 4
    freq = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (W/4,)
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * freq[None]  # (G, W/4)
    axis = torch.cat([pos.sin(), pos.cos()], dim=1)  # (G, W/2): one axis' code per coordinate
    rows = axis[:, None, :].expand(grid, grid, 2 * quarter)  # (G, G, W/2), by row index
    cols = axis[None, :, :].expand(grid, grid, 2 * quarter)  # (G, G, W/2), by column index
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, width).float()


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resampling of a (1, prefix + g*g, C) absolute position embedding to a new_grid^2 grid.

    Matches ALBEF's interpolate_pos_embed (bicubic, align_corners=False, no antialiasing); the prefix
    ([CLS]) embeddings are kept as they are. A no-op when the grid already has the right size.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, C), got {tuple(pos_embed.shape)}")
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(round(grid_tokens.shape[1] ** 0.5))
    if old * old != grid_tokens.shape[1]:
        raise ValueError(f"pos_embed grid of {grid_tokens.shape[1]} tokens is not square")
    if old == new_grid:
        return pos_embed
    c = grid_tokens.shape[-1]
    grid = grid_tokens.reshape(1, old, old, c).permute(0, 3, 1, 2).float()  # (1, C, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, c).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def kept_patches(num_patches: int, drop: float) -> int:
    """How many of `num_patches` patch tokens a patch dropout of share `drop` (0 <= drop < 1) keeps:
    floor(num_patches x (1 - drop)), at least one. The epsilon keeps 10 x (1 - 0.3) at 7, not 6."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"patch dropout must lie in [0, 1), got {drop}")
    return max(1, math.floor(num_patches * (1.0 - drop) + 1e-6))


def draw_patch_keep(
    batch: int, num_patches: int, drop: float, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices (B, K) of the patches each image keeps: an independent uniform K-subset per image
    (K = kept_patches), in raster order. Drawn on the device (no host sync)."""
    k = kept_patches(num_patches, drop)
    scores = torch.rand(batch, num_patches, device=device, generator=generator)
    return scores.argsort(dim=1)[:, :k].sort(dim=1).values


def forward_tokens(
    vit: VisionTransformer, image: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 3, S, S) -> tokens (B, prefix + N, W), or with `keep` (B, K) patch indices (B, prefix + K, W):
    the [CLS] token and the kept patches, with their position embeddings, through the blocks.

    keep=None is timm's `forward_features` itself. With `keep`, the patch embedding still runs on every
    patch (cheap; FLIP drops after it too); everything after it runs on 1 + K tokens.
    """
    if keep is None:
        return vit.forward_features(image)
    if vit.grad_checkpointing:
        raise NotImplementedError("patch dropout with timm's gradient checkpointing is not implemented")
    x = vit._pos_embed(vit.patch_embed(image))  # (B, prefix + N, W), position embeddings added
    prefix = vit.num_prefix_tokens
    idx = keep.to(torch.long).unsqueeze(-1).expand(-1, -1, x.shape[-1]) + prefix
    x = torch.cat([x[:, :prefix], x.gather(1, idx)], dim=1)
    x = vit.norm_pre(vit.patch_drop(x))
    return vit.norm(vit.blocks(x))
