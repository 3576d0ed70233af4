"""`model.itm_neg_temp`: the temperature of the ITM hard-negative draw (0 = the ITC temperature, ALBEF's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from albef_ds.config import ConfigError, load_config
from albef_ds.model.albef import ALBEFPretrain
from albef_ds.model.losses import sample_hard_negatives
from albef_ds.model.ops import PretrainOps
from tests.helpers import SPECIAL, tiny_model_config

DEBUG_CFG = str(Path(__file__).resolve().parents[2] / "configs/debug.yaml")


def _batch(b: int = 6):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (b, 9), generator=g)
    ids[:, 0] = SPECIAL["cls"]
    return image, ids, torch.ones_like(ids)


def _drawn_logits(neg_temp: float) -> tuple[list[torch.Tensor], float]:
    """The (B, B) logits the pre-training forward hands to the negative sampler, and the ITC temperature."""
    seen = []

    def sampler(sim):
        seen.append(sim.detach().clone())
        return sample_hard_negatives(sim)

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_config(queue_size=0), itm_neg_temp=neg_temp)
    model = ALBEFPretrain(cfg, special_tokens=SPECIAL, ops=PretrainOps(sample_hard_negatives=sampler))
    model(*_batch(), alpha=0.4)
    return seen, float(model.clamped_temp().detach())


def test_the_draw_uses_the_itc_temperature_by_default_and_the_set_one_otherwise():
    default, itc_temp = _drawn_logits(0.0)
    assert len(default) == 2  # a negative image per text, a negative text per image
    assert itc_temp == pytest.approx(0.07)
    soft, _ = _drawn_logits(5.0)
    for d, s in zip(default, soft):  # the same similarities, divided by 0.07 or by 5
        torch.testing.assert_close(d * itc_temp, s * 5.0, rtol=1e-5, atol=1e-6)


def test_a_negative_temperature_is_refused():
    with pytest.raises(ConfigError, match="model.itm_neg_temp must be >= 0"):
        load_config(DEBUG_CFG, ["model.itm_neg_temp=-1"])
