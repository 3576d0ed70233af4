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
        (["model.vision.patch_dropout=0.5"], 6, 12, "ours"),  # 32 of 64 patches in the online ViT
        (["model.vision.patch_dropout=0.8", "model.vision.patch_dropout_momentum=true"], 5, 10, "ours"),
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


def test_patch_dropout_flops_by_hand():
    """The debug model (64 px, 8 px patches: N = 64; ViT width 96, depth 3, MLP 384; BERT hidden 96,
    2 text + 2 fusion layers, embed 64) at patch dropout 0.5: the online ViT runs on T = 1 + 32 tokens."""
    b, length = 4, 10
    cfg = load_config(str(ROOT / "configs/debug.yaml"), ["model.vision.patch_dropout=0.5"]).model
    full = load_config(str(ROOT / "configs/debug.yaml"), []).model
    f, f0 = step_flops(cfg, b, length), step_flops(full, b, length)
    # Online ViT per image, in MACs: the patch embedding on all 64 patches, each block on 33 tokens (qkv,
    # scores + context, output projection, MLP), the [CLS] projection; x2 FLOPs, backward 1x (patch
    # embedding: weights only) or 2x.
    patch = 64 * (3 * 8 * 8) * 96
    block = 33 * 96 * 288 + 2 * 33 * 33 * 96 + 33 * 96 * 96 + 2 * 33 * 96 * 384
    rest = 3 * block + 96 * 64
    assert f.vit == 2 * b * (2 * patch + 3 * rest)
    # The momentum ViT and BERT_m still see all 65 tokens: unchanged.
    assert f.momentum == f0.momentum
    # ITM fusion (3B pairs) and the online MLM's fusion layers: each cross-attention block projects 32 fewer
    # image tokens to keys and values (2 x 32 x 96 x 96) and scores/contexts 32 fewer (2 x L x 32 x 96).
    fewer = 2 * (2 * 32 * 96 * 96 + 2 * length * 32 * 96)  # two fusion layers
    assert f0.fusion_itm - f.fusion_itm == 2 * 3 * b * fewer * 3
    assert f0.mlm - f.mlm == 2 * b * fewer * 3
    assert f.text == f0.text and f.itc == f0.itc
    # With patch_dropout_momentum the momentum ViT and BERT_m shrink the same way (forward only).
    cfg.vision.patch_dropout_momentum = True
    fm = step_flops(cfg, b, length)
    assert f.momentum - fm.momentum == 2 * b * (rest_full_minus(33) + fewer)


def rest_full_minus(tokens: int) -> int:
    """MACs the three ViT blocks of the debug model save on `tokens` instead of 65 tokens."""

    def blocks(t: int) -> int:
        return 3 * (t * 96 * 288 + 2 * t * t * 96 + t * 96 * 96 + 2 * t * 96 * 384)

    return blocks(65) - blocks(tokens)


def test_benchmark_counts_patch_dropout_for_ours_only():
    """`bench throughput` with model.vision.patch_dropout: "ours" drops patches and its model FLOPs (the MFU
    numerator) shrink accordingly; the reference recipe runs, and counts, every patch."""
    from albef_ds.bench.throughput import _recipe_config

    cfg = load_config(str(ROOT / "configs/debug.yaml"), ["model.vision.patch_dropout=0.5"])
    ours, ref = _recipe_config(cfg, "ours"), _recipe_config(cfg, "reference")
    assert ours.model.vision.patch_dropout == 0.5 and ref.model.vision.patch_dropout == 0.0
    full = step_flops(ref.model, 8, 25).total
    assert step_flops(ours.model, 8, 25).total < 0.8 * full
