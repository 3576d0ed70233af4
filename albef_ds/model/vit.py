"""ViT-B/16 image encoder (timm) with position-embedding resampling to any resolution."""

from __future__ import annotations

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
    return VisionTransformer(
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
