"""keep_attention: the SDPA path is untouched, the explicit path computes the same attention and hands back
probabilities in the autograd graph, and the module is put back on exit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from albef_ds.config import TextConfig
from albef_ds.model.attention import attention_with_probs, keep_attention
from albef_ds.model.bert import BertAttention, BertModel
from albef_ds.model.vit import build_vit
from tests.helpers import tiny_model_config

TEXT = TextConfig(
    vocab_size=50, hidden=32, layers=4, fusion_layer=2, heads=4, intermediate=64, max_position=32, dropout=0.0
)


def _sdpa_reference(attn: BertAttention, x, mask, kv):
    """BertAttention.forward as it was before keep_attention existed (SDPA), written out."""
    src = x if kv is None else kv
    b, lq, h = x.shape
    d = h // attn.heads
    q = attn.self.query(x).view(b, lq, attn.heads, d).transpose(1, 2)
    k = attn.self.key(src).view(b, src.shape[1], attn.heads, d).transpose(1, 2)
    v = attn.self.value(src).view(b, src.shape[1], attn.heads, d).transpose(1, 2)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.output(ctx.transpose(1, 2).reshape(b, lq, h), x)


@pytest.mark.parametrize("cross", [False, True])
def test_bert_attention_default_path_is_bit_identical_and_kept_path_matches(cross):
    attn = BertAttention(TEXT, kv_width=24 if cross else None).eval()
    x = torch.randn(3, 7, 32)
    kv = torch.randn(3, 5, 24) if cross else None
    valid = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    mask = None if cross else valid.bool()[:, None, None, :]
    out = attn(x, mask, kv=kv)
    assert torch.equal(out, _sdpa_reference(attn, x, mask, kv))
    with keep_attention(attn) as kept:
        kept_out = attn(x, mask, kv=kv)
    torch.testing.assert_close(kept_out, out, rtol=1e-5, atol=1e-6)
    lk = 5 if cross else 7
    assert kept.probs.shape == (3, 4, 7, lk) and kept.probs.requires_grad
    torch.testing.assert_close(kept.probs.sum(-1), torch.ones(3, 4, 7))
    if not cross:  # padded keys get probability 0
        assert (kept.probs[1, :, :, 4:] == 0).all() and (kept.probs[2, :, :, 2:] == 0).all()
    assert attn.kept is None and torch.equal(attn(x, mask, kv=kv), out)


def test_kept_probabilities_are_in_the_graph():
    attn = BertAttention(TEXT, kv_width=24).eval()
    x, kv, w = torch.randn(2, 6, 32), torch.randn(2, 5, 24), torch.randn(2, 6, 32)
    with keep_attention(attn) as kept:
        s = (attn(x, None, kv=kv) * w).sum()
    (g,) = torch.autograd.grad(s, kept.probs)
    # The same gradient through an explicit computation with a leaf probability tensor.
    q = attn.self.query(x).view(2, 6, 4, 8).transpose(1, 2)
    k = attn.self.key(kv).view(2, 5, 4, 8).transpose(1, 2)
    v = attn.self.value(kv).view(2, 5, 4, 8).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1).detach().requires_grad_()
    s2 = (attn.output((p @ v).transpose(1, 2).reshape(2, 6, 32), x) * w).sum()
    (g2,) = torch.autograd.grad(s2, p)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-6)
    assert g.abs().max() > 1e-3


def test_frozen_weights_still_give_a_differentiable_probability():
    attn = BertAttention(TEXT).eval().requires_grad_(False)
    with keep_attention(attn) as kept:
        s = attn(torch.randn(2, 6, 32), None).sum()
    assert kept.probs.requires_grad
    (g,) = torch.autograd.grad(s, kept.probs)
    assert g.shape == (2, 4, 6, 6)
    with torch.no_grad():  # no graph wanted: no leaf is forced
        _, p = attention_with_probs(*torch.randn(3, 1, 2, 4, 8), None)
    assert not p.requires_grad


def test_fusion_encoder_output_unchanged_inside_and_after_the_block():
    bert = BertModel(TEXT, cross_width=24).eval()
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    img = torch.randn(2, 5, 24)
    before = bert(ids, mask, img)
    with keep_attention(bert.encoder.layer[3].crossattention) as kept:
        inside = bert(ids, mask, img)
    after = bert(ids, mask, img)
    assert torch.equal(before, after)
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-5)
    assert kept.probs.shape == (2, 4, 6, 5)


def test_vit_block_kept_path_matches_timm_and_is_restored():
    vit = build_vit(tiny_model_config().vision).eval()
    image = torch.randn(2, 3, 32, 32)
    attn = vit.blocks[1].attn
    assert "forward" not in vars(attn)
    before = vit.forward_features(image)
    with keep_attention(attn) as kept:
        with keep_attention(attn) as inner:  # nested on the same instance: the inner one is restored first
            vit.forward_features(image)
        assert inner.probs is not None and "forward" in vars(attn)
        inside = vit.forward_features(image)
    assert "forward" not in vars(attn)
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(vit.forward_features(image), before)
    n = 1 + (32 // 8) ** 2
    assert kept.probs.shape == (2, 2, n, n)
    torch.testing.assert_close(kept.probs.sum(-1), torch.ones(2, 2, n))


def test_restored_after_an_exception_and_rejects_other_modules():
    attn = BertAttention(TEXT)
    with pytest.raises(RuntimeError, match="boom"):
        with keep_attention(attn):
            raise RuntimeError("boom")
    assert attn.kept is None
    with pytest.raises(TypeError, match="BertAttention or a timm ViT Attention"):
        with keep_attention(torch.nn.Linear(2, 2)):
            pass
