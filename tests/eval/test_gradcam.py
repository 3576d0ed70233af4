"""Grad-CAM maps against a hand-written forward (explicit attention, leaf probabilities, loops for the map),
padding, parameter gradients, train/eval modes, default layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from albef_ds.config import TextConfig
from albef_ds.eval.gradcam import default_fusion_layer, default_vit_block, itc_gradcam, itm_gradcam
from albef_ds.model.retrieval import ALBEFRetrieval
from tests.helpers import SPECIAL, tiny_model_config


def _model(layers: int = 6, fusion_layer: int = 2) -> ALBEFRetrieval:
    text = TextConfig(
        vocab_size=50,
        hidden=32,
        layers=layers,
        fusion_layer=fusion_layer,
        heads=4,
        intermediate=64,
        max_position=32,
        dropout=0.1,  # eval mode must switch it off
    )
    model = ALBEFRetrieval(tiny_model_config(text=text), special_tokens=SPECIAL)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights than BERT's N(0, 0.02): peaked attention, a map worth comparing
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.endswith("_m"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    return model


def _inputs(b: int = 3, length: int = 7):
    image = torch.randn(b, 3, 32, 32)
    ids = torch.randint(5, 50, (b, length))
    ids[:, 0] = SPECIAL["cls"]
    lengths = [length, 4, 2][:b]
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, SPECIAL["pad"])
    return image, ids, mask


def _leaf_softmax(q, k):
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return probs.detach().requires_grad_()  # d(score)/d(probs) through the rest of the forward only


def _split_heads(t, heads):  # (B, N, H) -> (B, heads, N, H / heads)
    b, n, h = t.shape
    return t.view(b, n, heads, h // heads).transpose(1, 2)


def _manual_itm_map(model, image, ids, mask, layer):
    """The ITM Grad-CAM map by hand: layer `layer` written out with its weights, the map by loops."""
    model.eval()
    bert = model.text_encoder.bert
    img = model.visual_encoder.forward_features(image)
    key_mask = mask.bool()[:, None, None, :]
    x = bert.encode_text(ids, mask)
    for blk in bert.encoder.layer[bert.fusion_layer : layer]:
        x = blk(x, key_mask, img)
    blk = bert.encoder.layer[layer]
    x = blk.attention(x, key_mask)
    ca = blk.crossattention
    heads = ca.heads
    q = _split_heads(ca.self.query(x), heads)
    k, v = _split_heads(ca.self.key(img), heads), _split_heads(ca.self.value(img), heads)
    probs = _leaf_softmax(q, k)  # (B, heads, L, 1+N)
    ctx = (probs @ v).transpose(1, 2).reshape(x.shape)
    x = ca.output.LayerNorm(ca.output.dense(ctx) + x)
    x = blk.output.LayerNorm(blk.output.dense(F.gelu(blk.intermediate.dense(x))) + x)
    for blk in bert.encoder.layer[layer + 1 :]:
        x = blk(x, key_mask, img)
    score = model.itm_head(x[:, 0])[:, 1].sum()
    (grad,) = torch.autograd.grad(score, probs)
    b, n = image.shape[0], probs.shape[-1] - 1
    out = torch.zeros(b, n)
    for i in range(b):
        rows = [r for r in range(ids.shape[1]) if mask[i, r]]
        for r in rows:
            for h in range(heads):
                out[i] += probs[i, h, r, 1:] * grad[i, h, r, 1:].clamp(min=0) / heads
        out[i] /= len(rows)
    g = math.isqrt(n)
    return out.view(b, g, g)


def _manual_itc_map(model, image, ids, mask, block):
    """The ITC Grad-CAM map by hand: the ViT written out block by block, block `block` explicitly."""
    model.eval()
    vit = model.visual_encoder
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))  # (B, 1+N, C)
    for i, blk in enumerate(vit.blocks):
        if i != block:
            x = blk(x)
            continue
        a = blk.attn
        b, n, c = x.shape
        qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        probs = _leaf_softmax(qkv[0], qkv[1])  # (B, heads, 1+N, 1+N)
        x = x + blk.ls1(a.proj((probs @ qkv[2]).transpose(1, 2).reshape(b, n, c)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    image_feat = F.normalize(model.vision_proj(vit.norm(x)[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(model.text_encoder.bert.encode_text(ids, mask)[:, 0]), dim=-1)
    score = sum(image_feat[i] @ text_feat[i] for i in range(image.shape[0]))
    (grad,) = torch.autograd.grad(score, probs)
    cam = torch.stack(
        [
            sum(probs[i, h, 0, 1:] * grad[i, h, 0, 1:].clamp(min=0) for h in range(a.num_heads)) / a.num_heads
            for i in range(image.shape[0])
        ]
    )
    g = math.isqrt(cam.shape[1])
    return cam.view(-1, g, g)


@pytest.mark.parametrize("layer", [None, 3])
def test_itm_gradcam_matches_the_hand_computation(layer):
    model = _model()
    image, ids, mask = _inputs()
    model.train()
    got = itm_gradcam(model, image, ids, mask, layer=layer)
    want = _manual_itm_map(
        model, image, ids, mask, 3 if layer is None else layer
    )  # default: fusion_layer + (4 fusion layers) // 3
    assert got.shape == (3, 4, 4) and not got.requires_grad
    assert want.abs().max() > 0 and want.std() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_itc_gradcam_matches_the_hand_computation():
    model = _model()
    image, ids, mask = _inputs()
    got = itc_gradcam(model, image, ids, mask)  # the tiny ViT has 2 blocks: the last one
    want = _manual_itc_map(model, image, ids, mask, 1)
    assert got.shape == (3, 4, 4)
    assert want.abs().max() > 0 and want.std() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    torch.testing.assert_close(
        itc_gradcam(model, image, ids, mask, block=0),
        _manual_itc_map(model, image, ids, mask, 0),
        rtol=1e-4,
        atol=1e-9,
    )


@pytest.mark.parametrize("fn", [itm_gradcam, itc_gradcam])
def test_padding_rows_do_not_contribute(fn):
    model = _model()
    image, ids, mask = _inputs()
    padded = fn(model, image, ids, mask)
    for i in range(3):
        n = int(mask[i].sum())
        alone = fn(model, image[i : i + 1], ids[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(padded[i : i + 1], alone, rtol=1e-4, atol=1e-6 * alone.abs().max().item())


@pytest.mark.parametrize("fn", [itm_gradcam, itc_gradcam])
def test_parameter_grads_and_modes_untouched_and_works_under_no_grad(fn):
    model = _model()
    image, ids, mask = _inputs()
    model.train()
    model.visual_encoder_m.eval()  # mixed modes must come back as found
    modes = {n: m.training for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    marked = list(params)[::3]
    for n in marked:
        params[n].grad = torch.full_like(params[n], 0.5)
    with torch.no_grad():
        cam = fn(model, image, ids, mask)
    assert cam.abs().max() > 0
    for n, p in params.items():
        if n in marked:
            assert torch.equal(p.grad, torch.full_like(p, 0.5)), n
        else:
            assert p.grad is None, n
    assert {n: m.training for n, m in model.named_modules()} == modes


@pytest.mark.parametrize("fn", [itm_gradcam, itc_gradcam])
def test_frozen_model_gives_the_same_map(fn):
    model = _model()
    image, ids, mask = _inputs()
    want = fn(model, image, ids, mask)
    model.requires_grad_(False)
    torch.testing.assert_close(fn(model, image, ids, mask), want)


def test_default_layers_and_range_errors():
    assert default_fusion_layer(6, 12) == 8  # ALBEF-base: the third fusion layer
    assert default_fusion_layer(2, 4) == 2  # two fusion layers: the first one (a third of the way in)
    assert default_fusion_layer(2, 3) == 2
    assert default_fusion_layer(2, 8) == 4  # six fusion layers: the third, as ALBEF-base
    assert default_vit_block(12) == 8 and default_vit_block(9) == 8 and default_vit_block(2) == 1
    with pytest.raises(ValueError, match="no fusion layer"):
        default_fusion_layer(4, 4)
    model = _model(layers=4)
    image, ids, mask = _inputs()
    torch.testing.assert_close(
        itm_gradcam(model, image, ids, mask), itm_gradcam(model, image, ids, mask, layer=2)
    )
    with pytest.raises(ValueError, match="fusion layers are 2..3"):
        itm_gradcam(model, image, ids, mask, layer=1)
    with pytest.raises(ValueError, match="blocks 0..1"):
        itc_gradcam(model, image, ids, mask, block=2)
    with pytest.raises(ValueError, match="at least one valid token"):
        itm_gradcam(model, image, ids, torch.zeros_like(mask))
