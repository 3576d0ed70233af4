"""The analytic FLOP counter against torch's FlopCounterMode on real forward + backward passes.

Attention runs on SDPA's math path here so that FlopCounterMode sees its matrix products (the fused CPU
kernel is not registered with the counter); everything else is the model as it trains.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from albef_ds.bench.flops import step_flops
from albef_ds.bench.recipes import recipe_ops
from albef_ds.config import load_config
from albef_ds.model import ALBEFPretrain
from tests.helpers import ROOT, SPECIAL


def _measured(model_cfg, batch: int, length: int, recipe: str) -> int:
    m = ALBEFPretrain(model_cfg, special_tokens=SPECIAL)
    m.ops = recipe_ops(recipe)
    s = model_cfg.vision.image_size
    image = torch.randn(batch, 3, s, s)
    ids = torch.randint(5, model_cfg.text.vocab_size, (batch, length))
    ids[:, 0] = SPECIAL["cls"]
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = m(image, ids, torch.ones_like(ids), alpha=0.4)
        out.loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "overrides,batch,length,recipe",
    [
        ([], 8, 25, "ours"),  # the debug config as shipped (no queue)
        (["model.queue_size=300"], 5, 17, "ours"),  # a queue, odd batch and length
        (["model.queue_size=64", "model.vision.image_size=48"], 6, 12, "reference"),  # full-sequence MLM head
    ],
)
def test_analytic_flops_match_flop_counter_on_debug_config(overrides, batch, length, recipe):
    cfg = load_config(str(ROOT / "configs/debug.yaml"), overrides)
    measured = _measured(cfg.model, batch, length, recipe)
    heads = "all" if recipe == "reference" else "masked"
    predicted = step_flops(cfg.model, batch, length, mlm_head_positions=heads).total
    assert predicted == pytest.approx(measured, rel=0.05), (predicted, measured)


def test_components_add_up_and_scale():
    cfg = load_config(str(ROOT / "configs/pretrain_4m.yaml"), [])
    f = step_flops(cfg.model, 64, 30)
    parts = f.as_dict()
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    # ALBEF-base at 256 px: the anchor is about 300 GFLOP per pair (2 per MAC, bwd = 2 x fwd).
    per_pair = f.total / 64 / 1e9
    assert 200 < per_pair < 400, per_pair
    # The reference's full-sequence MLM head costs more; the queue adds ITC work linearly.
    assert step_flops(cfg.model, 64, 30, mlm_head_positions="all").mlm > f.mlm
    cfg.model.queue_size *= 2
    assert step_flops(cfg.model, 64, 30).itc > f.itc
    with pytest.raises(ValueError, match="mlm_head_positions"):
        step_flops(cfg.model, 64, 30, mlm_head_positions="some")
