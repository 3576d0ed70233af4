from __future__ import annotations

import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.data import transforms as T
from albef_ds.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    RandomAugment,
    apply_op,
    eval_transform,
    pretrain_transform,
)


def _test_image(w: int = 80, h: int = 64) -> Image.Image:
    # Low-contrast gradient + noise + an off-centre bright block: every op except Identity changes it.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 70 + 60 * xx / w + 30 * yy / h
    img = np.stack([base, base * 0.9, base * 0.8], -1) + rng.normal(0, 6, (h, w, 3))
    img[10:30, 12:40] = (170, 150, 120)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_op_set_is_albefs() -> None:
    assert set(RandomAugment.OPS) == {
        "Identity",
        "AutoContrast",
        "Equalize",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    }


@pytest.mark.parametrize("name", RandomAugment.OPS)
@pytest.mark.parametrize("negate", [False, True])
def test_each_op_changes_image_except_identity(name: str, negate: bool) -> None:
    img = _test_image()
    out = apply_op(img, name, 7, negate)
    assert out.size == img.size and out.mode == "RGB"
    changed = not np.array_equal(np.asarray(out), np.asarray(img))
    assert changed == (name != "Identity")


def test_geometric_ops_fill_grey_and_magnitudes() -> None:
    img = Image.new("RGB", (40, 40), (255, 0, 0))
    # Translate at level 7 moves by 7 px: the uncovered 7 columns are the fill colour.
    out = np.asarray(apply_op(img, "TranslateX", 7))
    assert (out[:, -7:] == 128).all() and (out[:, :32] == (255, 0, 0)).all()
    out = np.asarray(apply_op(img, "TranslateY", 7, negate=True))
    assert (out[:7] == 128).all() and (out[8:] == (255, 0, 0)).all()
    # Rotation by 21 degrees uncovers the corners.
    out = np.asarray(apply_op(img, "Rotate", 7))
    assert (out[0, 0] == 128).all() and (out[20, 20] == (255, 0, 0)).all()
    # Brightness factor at level 7 is 7/10 * 1.8 + 0.1 = 1.36.
    grey = Image.new("RGB", (8, 8), (100, 100, 100))
    assert np.asarray(apply_op(grey, "Brightness", 7))[0, 0, 0] == 136
    with pytest.raises(ValueError, match="unknown"):
        apply_op(img, "Solarize", 7)


def test_random_augment_samples_uniformly_with_half_probability(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    for name in RandomAugment.OPS:

        def record(img, level, negate, _name=name):
            calls[_name] += 1
            assert level == 7
            return img

        monkeypatch.setitem(T.RANDAUG_OPS, name, record)
    aug = RandomAugment(2, 7)
    torch.manual_seed(0)
    img = _test_image(8, 8)
    for _ in range(2000):
        aug(img)
    total = sum(calls.values())
    assert 1800 < total < 2200  # 4000 draws, each applied with probability 0.5
    assert set(calls) == set(RandomAugment.OPS)
    assert min(calls.values()) > 120  # about 200 each


def test_pretrain_transform_shape_range_and_pickle() -> None:
    t = pretrain_transform(32, crop_scale=(0.5, 1.0))
    t = pickle.loads(pickle.dumps(t))
    x = t(_test_image())
    assert type(x) is torch.Tensor and x.shape == (3, 32, 32) and x.dtype == torch.float32
    lo = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    hi = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert (x >= lo[:, None, None] - 1e-5).all() and (x <= hi[:, None, None] + 1e-5).all()
    assert x.std() > 0.05


def test_eval_transform_is_deterministic_resize_and_normalise() -> None:
    grey = Image.new("RGB", (50, 30), (128, 128, 128))
    x = eval_transform(24)(grey)
    assert x.shape == (3, 24, 24)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x.mean((1, 2)), expected, atol=1e-4, rtol=0)


def test_pretrain_transform_reproducible_under_seed() -> None:
    t = pretrain_transform(32)
    img = _test_image()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        random.seed(seed)
        outs.append(torch.stack([t(img) for _ in range(4)]))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_no_augment_options() -> None:
    t = pretrain_transform(32, crop_scale=(1.0, 1.0), hflip=False, randaug_n=0)
    img = _test_image(32, 32)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(1)
    torch.testing.assert_close(a, t(img))  # full-area crop at the same size, no flip, no RandAugment
