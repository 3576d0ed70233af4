"""FLIP-style patch dropout (`model.vision.patch_dropout`): how many patches are kept, which ones, that the
kept tokens are all the online image path sees, and that p = 0 and evaluation are the model without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from albef_ds.config import ConfigError, load_config
from albef_ds.model import ALBEFPretrain
from albef_ds.model.vit import build_vit, draw_patch_keep, forward_tokens, kept_patches
from tests.helpers import SPECIAL, tiny_model_config

# tiny_model_config: 32 px images, 8 px patches -> 16 patches; no dropout anywhere else (text dropout 0,
# drop_path 0), so training and evaluation mode differ only by patch dropout.
N = 16


def _cfg(p: float = 0.0, momentum: bool = False):
    cfg = tiny_model_config()
    cfg.vision = dataclasses.replace(cfg.vision, patch_dropout=p, patch_dropout_momentum=momentum)
    return cfg


def _batch(b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (b, 9), generator=g)
    ids[:, 0] = SPECIAL["cls"]
    return image, ids, torch.ones_like(ids)


def _losses(model, seed: int = 3):
    torch.manual_seed(seed)
    out = model(*_batch(), alpha=0.4)
    return torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_mlm]), torch.get_rng_state()


@pytest.mark.parametrize(
    "n,p,k",
    [(16, 0.0, 16), (16, 0.5, 8), (16, 0.75, 4), (10, 0.3, 7), (10, 0.1, 9), (196, 0.5, 98), (4, 0.99, 1)],
)
def test_kept_patch_count(n, p, k):
    assert kept_patches(n, p) == k
    assert draw_patch_keep(3, n, p, torch.device("cpu")).shape == (3, k)


@pytest.mark.parametrize("p", [1.0, -0.1])
def test_kept_patch_count_rejects_out_of_range(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        kept_patches(16, p)


@pytest.mark.parametrize("value", ["1.0", "-0.25"])
def test_config_range_names_the_field(value):
    with pytest.raises(ConfigError, match=r"model\.vision\.patch_dropout must be in \[0, 1\)"):
        load_config(None, [f"model.vision.patch_dropout={value}"])


def test_draws_are_distinct_sorted_random_and_uniform():
    keep = draw_patch_keep(2000, N, 0.75, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert keep.shape == (2000, 4) and keep.dtype == torch.long
    assert bool((keep[:, 1:] > keep[:, :-1]).all())  # distinct, in raster order
    assert int(keep.min()) >= 0 and int(keep.max()) < N
    # Independent per image: many different subsets (1820 possible), none dominating.
    subsets = {tuple(r) for r in keep.tolist()}
    assert len(subsets) > 600
    # Uniform: each patch is kept with probability K/N = 1/4 (2000 x 4 draws: 500 each, sd about 19).
    counts = torch.bincount(keep.flatten(), minlength=N)
    assert int(counts.min()) > 420 and int(counts.max()) < 580, counts.tolist()
    again = draw_patch_keep(2000, N, 0.75, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert not torch.equal(keep, again)


def test_forward_tokens_all_patches_is_timms_forward():
    vit = build_vit(tiny_model_config().vision).eval()
    image = _batch()[0]
    every = torch.arange(N).expand(4, N)
    assert torch.equal(forward_tokens(vit, image, every), vit.forward_features(image))
    assert torch.equal(forward_tokens(vit, image), vit.forward_features(image))


def test_only_kept_patches_reach_the_tokens():
    vit = build_vit(tiny_model_config().vision).eval()
    image = _batch(2)[0]
    keep = torch.tensor([[0, 5, 6, 15], [1, 2, 3, 4]])
    tokens = forward_tokens(vit, image, keep)
    assert tokens.shape == (2, 1 + 4, 32)
    # Patch 7 (row 1, column 3 of the 4 x 4 grid: pixels [8:16, 24:32]) is dropped in both images: changing
    # it changes nothing; changing patch 5, kept in image 0 only, changes image 0 only.
    changed = image.clone()
    changed[:, :, 8:16, 24:32] += 5.0
    assert torch.equal(forward_tokens(vit, changed, keep), tokens)
    changed = image.clone()
    changed[0, :, 8:16, 8:16] += 5.0  # patch 5 = row 1, column 1
    out = forward_tokens(vit, changed, keep)
    assert not torch.allclose(out[0], tokens[0]) and torch.equal(out[1], tokens[1])


def test_p0_is_bit_identical_and_evaluation_ignores_the_option():
    torch.manual_seed(0)
    plain = ALBEFPretrain(_cfg(0.0), special_tokens=SPECIAL)
    torch.manual_seed(0)
    dropped = ALBEFPretrain(_cfg(0.5), special_tokens=SPECIAL)
    dropped.load_state_dict(plain.state_dict())
    ref, ref_rng = _losses(plain)
    # Evaluation mode: the p = 0.5 model sees every patch and draws nothing: the same losses, bit for bit,
    # and the same random stream afterwards (the MLM masking drew the same numbers).
    dropped.eval()
    got, got_rng = _losses(dropped)
    assert torch.equal(got, ref) and torch.equal(got_rng, ref_rng)
    assert dropped.patch_keep(_batch()[0]) is None
    # Training mode: it drops patches (other losses, a longer random stream).
    dropped.train()
    trained, trained_rng = _losses(dropped)
    assert not torch.equal(trained, ref) and not torch.equal(trained_rng, ref_rng)


def _spy(model):
    """Record the image tokens every consumer receives in one pre-training forward."""
    seen: dict[str, list] = {"online": [], "momentum": [], "keep": [], "fuse": [], "mlm": [], "mlm_m": []}
    encode = model.encode_image

    def encode_image(image, *, momentum=False, keep=None):
        out = encode(image, momentum=momentum, keep=keep)
        seen["momentum" if momentum else "online"].append(out[0])
        seen["keep"].append((momentum, keep))
        return out

    fuse = model.text_encoder.bert.fuse
    model.encode_image = encode_image
    model.text_encoder.bert.fuse = lambda t, m, img: (seen["fuse"].append(img), fuse(t, m, img))[1]
    for name, key in (("text_encoder", "mlm"), ("text_encoder_m", "mlm_m")):
        bert = getattr(model, name).bert
        bert.register_forward_pre_hook(lambda mod, args, key=key: seen[key].append(args[2]))
    return seen


@pytest.mark.parametrize("momentum", [False, True])
def test_the_same_kept_tokens_feed_itc_itm_and_mlm(momentum):
    model = ALBEFPretrain(_cfg(0.5, momentum), special_tokens=SPECIAL)
    seen = _spy(model)
    model(*_batch(), alpha=0.4)
    (online,), (mom,) = seen["online"], seen["momentum"]
    k = kept_patches(N, 0.5)
    assert online.shape == (4, 1 + k, 32)
    # ITM: one fusion pass over [positives; negative images; positives] built from the online tokens.
    (itm,) = [x for x in seen["fuse"] if x.shape[0] == 12]  # (the MLM's BERT forward fuses too)
    assert itm.shape == (12, 1 + k, 32) and torch.equal(itm[:4], online) and torch.equal(itm[8:], online)
    (mlm,) = seen["mlm"]
    assert mlm is online  # MLM fuses the very tensor ITC's [CLS] feature came from
    (online_keep, mom_keep) = (kk for _, kk in seen["keep"])
    assert online_keep.shape == (4, k)
    if momentum:  # the momentum ViT sees the same patches
        assert mom_keep is online_keep and mom.shape == (4, 1 + k, 32)
    else:  # all of them, unless asked
        assert mom_keep is None and mom.shape == (4, 1 + N, 32)
    assert seen["mlm_m"][0] is mom


def test_every_forward_draws_new_patches():
    model = ALBEFPretrain(_cfg(0.5), special_tokens=SPECIAL)
    image = _batch()[0]
    a, b = model.patch_keep(image), model.patch_keep(image)
    assert a.shape == b.shape == (4, 8) and not torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 1  # images of one batch keep different patches
