"""`model.vision.pos_embed_init`: the 2-D sine-cosine start of the ViT's position embeddings."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from albef_ds.config import ConfigError, load_config
from albef_ds.model.albef import ALBEFPretrain
from albef_ds.model.vit import build_vit, sincos_pos_embed
from tests.helpers import SPECIAL, tiny_model_config

DEBUG_CFG = str(Path(__file__).resolve().parents[2] / "configs/debug.yaml")


def test_sincos_values_by_hand():
    # grid 3, width 8: quarter 2, frequencies 1 and 10000^(-1/2) = 0.01.
    pe = sincos_pos_embed(3, 8)
    assert pe.shape == (9, 8)
    for r in range(3):
        for c in range(3):
            want = [
                math.sin(r),
                math.sin(r * 0.01),
                math.cos(r),
                math.cos(r * 0.01),
                math.sin(c),
                math.sin(c * 0.01),
                math.cos(c),
                math.cos(c * 0.01),
            ]
            assert pe[r * 3 + c].tolist() == pytest.approx(want, abs=1e-6), (r, c)


def test_sincos_tells_every_patch_apart_and_needs_a_width_divisible_by_4():
    pe = sincos_pos_embed(8, 96)
    d = torch.cdist(pe, pe)
    assert d[~torch.eye(64, dtype=torch.bool)].min() > 0.1  # no two grid cells share a code
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(4, 10)


def test_build_vit_applies_the_init_and_leaves_the_default_alone():
    cfg = tiny_model_config()
    grid = cfg.vision.image_size // cfg.vision.patch_size
    torch.manual_seed(0)
    default = build_vit(cfg.vision)
    assert default.pos_embed.std().item() < 0.05  # timm's trunc_normal(0.02)
    torch.manual_seed(0)
    sincos = build_vit(dataclasses.replace(cfg.vision, pos_embed_init="sincos"))
    assert torch.equal(sincos.pos_embed[0, 1:], sincos_pos_embed(grid, cfg.vision.width))
    assert torch.equal(sincos.pos_embed[0, :1], default.pos_embed[0, :1])  # the [CLS] row is timm's
    assert torch.equal(sincos.blocks[0].attn.qkv.weight, default.blocks[0].attn.qkv.weight)
    assert sincos.pos_embed.requires_grad  # a start value, still learned


def test_the_momentum_vit_starts_from_the_same_sincos_embeddings():
    cfg = tiny_model_config()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pos_embed_init="sincos"))
    model = ALBEFPretrain(cfg, special_tokens=SPECIAL)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    want = sincos_pos_embed(grid, cfg.vision.width)
    assert torch.equal(model.visual_encoder.pos_embed[0, 1:], want)
    assert torch.equal(model.visual_encoder_m.pos_embed[0, 1:], want)


def test_config_refuses_an_unknown_init_and_a_width_not_divisible_by_4():
    with pytest.raises(ConfigError, match="model.vision.pos_embed_init must be"):
        load_config(DEBUG_CFG, ["model.vision.pos_embed_init=learned"])
    with pytest.raises(ConfigError, match="divisible by 4"):
        load_config(
            DEBUG_CFG,
            ["model.vision.pos_embed_init=sincos", "model.vision.width=90", "model.vision.heads=3"],
        )
