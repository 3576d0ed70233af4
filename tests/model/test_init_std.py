"""`model.text.init_std`: the std of the text / fusion encoder's random start (BERT's initializer_range)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from albef_ds.config import ConfigError, TextConfig, load_config
from albef_ds.model.albef import ALBEFPretrain
from albef_ds.model.nlvr import ALBEFNLVR2
from tests.helpers import SPECIAL, tiny_model_config

DEBUG_CFG = str(Path(__file__).resolve().parents[2] / "configs/debug.yaml")


def _weights(module: nn.Module) -> torch.Tensor:
    """Every linear and embedding weight of `module`, flattened into one vector."""
    ws = [m.weight.detach().flatten() for m in module.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    return torch.cat(ws)


def _wide(cfg, std: float):
    # wide enough that the sample std of the drawn weights is within a few % of the drawn std
    text = dataclasses.replace(cfg.text, hidden=64, heads=4, intermediate=128, init_std=std)
    return dataclasses.replace(cfg, text=text)


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_the_text_and_fusion_weights_are_drawn_at_init_std(std):
    torch.manual_seed(0)
    model = ALBEFPretrain(_wide(tiny_model_config(), std), special_tokens=SPECIAL)
    for enc in (model.text_encoder, model.text_encoder_m):  # the momentum copy starts equal
        w = _weights(enc)
        assert w.std().item() == pytest.approx(std, rel=0.03)
        assert abs(w.mean().item()) < 0.05 * std
    layer = model.text_encoder.bert.encoder.layer[-1]  # a fusion layer: its cross-attention too
    assert layer.crossattention.self.query.weight.std().item() == pytest.approx(std, rel=0.1)
    linears = [m for m in model.text_encoder.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    assert linears and all(torch.count_nonzero(m.bias) == 0 for m in linears)
    norms = [m for m in model.text_encoder.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)


def test_the_nlvr2_encoder_follows_it_too():
    torch.manual_seed(0)
    model = ALBEFNLVR2(_wide(tiny_model_config(), 0.1))
    assert _weights(model.text_encoder).std().item() == pytest.approx(0.1, rel=0.03)


def test_default_is_berts_and_a_non_positive_std_is_refused():
    assert TextConfig().init_std == 0.02
    with pytest.raises(ConfigError, match="model.text.init_std must be > 0"):
        load_config(DEBUG_CFG, ["model.text.init_std=0"])
