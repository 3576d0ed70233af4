"""Small builders shared by the tests."""

from __future__ import annotations

from albef_ds.config import ModelConfig, TextConfig, VisionConfig

SPECIAL = {"pad": 0, "cls": 2, "mask": 4}


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(
            vocab_size=50,
            hidden=32,
            layers=4,
            fusion_layer=2,
            heads=2,
            intermediate=64,
            max_position=32,
            dropout=0.0,
        ),
        embed_dim=16,
        queue_size=20,
    )
    base.update(kw)
    return ModelConfig(**base)
