"""NLVR2's paired fusion and text assignment, SNLI-VE's head, and the distillation loss both share."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from albef_ds.model import ALBEFPretrain
from albef_ds.model.losses import distill_ce, text_assignment
from albef_ds.model.nlvr import ALBEFNLVR2, ALBEFTextAssignment
from albef_ds.model.ve import ALBEFVE
from albef_ds.model.weights import load_state
from tests.helpers import SPECIAL, tiny_model_config
from tests.model.test_weights import _to_released_layout


def _pretrained() -> ALBEFPretrain:
    src = ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL)
    with torch.no_grad():
        for b in src.buffers():
            if b.is_floating_point():
                b.add_(torch.randn_like(b))
    return src


@pytest.mark.parametrize("released", [False, True])
def test_paired_blocks_start_from_their_fusion_layer(released):
    src = _pretrained()
    sd = _to_released_layout(src.state_dict()) if released else src.state_dict()
    dst = ALBEFNLVR2(tiny_model_config())
    report = load_state(dst, sd, layout="albef" if released else "ours")
    assert not [k for k in report.missing if not k.startswith("cls_head")]  # only the new head is missing
    f, pairs = 2, 2
    assert len(dst.text_encoder.bert.encoder.layer) == f + 2 * pairs
    for sfx in ("", "_m"):
        s_layers = getattr(src, "text_encoder" + sfx).bert.encoder.layer
        d_layers = getattr(dst, "text_encoder" + sfx).bert.encoder.layer
        for i in range(f):
            for k, v in s_layers[i].state_dict().items():
                assert torch.equal(d_layers[i].state_dict()[k], v), (sfx, i, k)
        for k_ in range(pairs):
            want = s_layers[f + k_].state_dict()
            for block in (f + 2 * k_, f + 2 * k_ + 1):
                got = d_layers[block].state_dict()
                assert got.keys() == want.keys()
                for k, v in want.items():
                    assert torch.equal(got[k], v), (sfx, block, k)


def test_key_and_value_of_a_pair_are_one_parameter():
    m = ALBEFNLVR2(tiny_model_config())
    layers = m.text_encoder.bert.encoder.layer
    for k in range(2):
        even, odd = layers[2 + 2 * k].crossattention.self, layers[3 + 2 * k].crossattention.self
        assert even.key.weight is odd.key.weight and even.value.bias is odd.value.bias
        assert even.query.weight is not odd.query.weight
    names = [n for n, _ in m.named_parameters()]
    pair = {f"text_encoder.bert.encoder.layer.{i}.crossattention.self.key.weight" for i in (2, 3)}
    assert len(pair & set(names)) == 1  # one optimizer entry for the pair's key projection
    ids = [id(p) for p in m.parameters()]
    assert len(ids) == len(set(ids))
    # The momentum copy keeps the tie (its buffers are shared the same way).
    mlayers = m.text_encoder_m.bert.encoder.layer
    assert mlayers[2].crossattention.self.key.weight is mlayers[3].crossattention.self.key.weight


def test_equal_images_reproduce_each_fusion_layer_applied_twice():
    src = _pretrained().eval()
    dst = ALBEFNLVR2(tiny_model_config()).eval()
    load_state(dst, src.state_dict(), layout="ours")
    image = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[2, 7, 9, 11, 0], [2, 5, 6, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        tokens = src.visual_encoder.forward_features(image)
        x = src.text_encoder.bert.encode_text(ids, mask)
        key = mask.bool()[:, None, None, :]
        for layer in src.text_encoder.bert.encoder.layer[2:]:
            x = layer(layer(x, key, tokens, None), key, tokens, None)  # the pair: the same layer twice
        got = dst.text_encoder(ids, mask, *[dst.visual_encoder.forward_features(image)] * 2)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temp", [0.07, 0.5, 0.0])
def test_text_assignment_follows_its_probabilities(temp):
    torch.manual_seed(0)
    b, d, n = 6, 8, 4000
    feat = F.normalize(torch.randn(b, d), dim=-1)
    labels, partner_counts = torch.zeros(3), torch.zeros(b, b)
    for _ in range(n):
        s0, s1, y = text_assignment(feat, temp=temp)
        own = torch.arange(b)
        labels += torch.bincount(y, minlength=3)
        # the true image sits in slot y for y < 2, in no slot for y = 2; a partner is never the true image
        assert torch.equal(s0 == own, y == 0) and torch.equal(s1 == own, y == 1)
        assert (s0 != s1).all()
        first = torch.where(y == 0, s1, s0)  # the first partner drawn
        partner_counts[own, first] += 1
    freq = labels / labels.sum()
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.015), freq  # 3-sigma is about 0.005
    logits = feat @ feat.t() / temp if temp else torch.zeros(b, b)  # 0: uniform over the others
    logits.fill_diagonal_(float("-inf"))
    want = logits.softmax(1)
    got = partner_counts / partner_counts.sum(1, keepdim=True)
    assert (partner_counts.diagonal() == 0).all()
    assert (got - want).abs().max() < 0.03, (got, want)
    with pytest.raises(ValueError, match="at least 3"):
        text_assignment(feat[:2])
    with pytest.raises(ValueError, match="partner temperature"):
        text_assignment(feat, temp=-1.0)


def test_distill_ce_is_the_stated_mixture():
    z, z_m = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 2])
    ce = -sum(z[i].log_softmax(-1)[y[i]] for i in range(4)) / 4
    soft = -sum((z_m[i].softmax(-1) * z[i].log_softmax(-1)).sum() for i in range(4)) / 4
    torch.testing.assert_close(distill_ce(z, z_m, y, 0.4), 0.6 * ce + 0.4 * soft)
    torch.testing.assert_close(distill_ce(z, None, y, 0.4), ce)


def test_models_train_one_step():
    cfg = tiny_model_config()
    image = torch.randn(4, 3, 32, 32)
    ids = torch.randint(5, 50, (4, 6))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    label = torch.tensor([0, 1, 2, 1])
    ve = ALBEFVE(cfg)
    out = ve(image, ids, mask, label, alpha=0.4)
    out.loss.backward()
    assert out.logits.shape == (4, 3) and ve.cls_head[2].weight.grad.abs().sum() > 0
    nlvr = ALBEFNLVR2(cfg)
    out = nlvr(image, image.flip(0), ids, mask, label % 2, alpha=0.4)
    out.loss.backward()
    assert out.logits.shape == (4, 2) and math.isfinite(out.loss.item())
    key = nlvr.text_encoder.bert.encoder.layer[3].crossattention.self.key.weight
    assert key.grad.abs().sum() > 0  # gradients of both blocks reach the tied projection
    ta = ALBEFTextAssignment(cfg)
    out = ta(image, ids, mask)
    out.loss.backward()
    assert out.logits.shape == (4, 3) and ta.ta_head.weight.grad.abs().sum() > 0
