"""Image transforms: ALBEF's RandAugment variant, the pre-training pipeline and the evaluation pipeline.

All randomness comes from torch's global RNG, which DataLoader workers seed per worker and which
`ImageTextDataset` can pin per sample, so augmentation is reproducible for a given seed and epoch.
Every transform is a module-level class or a torchvision transform, so the pipelines pickle (spawned workers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import InterpolationMode, v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_LEVEL = 10.0  # RandAugment magnitudes are given on a 0..10 scale
FILL = (128, 128, 128)  # colour of the area uncovered by geometric ops
TRANSLATE_CONST = 10.0  # pixels of translation at MAX_LEVEL


def enhance_factor(level: float) -> float:
    """Brightness / Sharpness enhance factor at RandAugment `level` (0..10): 0.1 .. 1.9 (shared with DALI)."""
    return level / MAX_LEVEL * 1.8 + 0.1


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    # PIL's AFFINE maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=FILL)


def _identity(img: Image.Image, level: float, negate: bool) -> Image.Image:
    return img


def _autocontrast(img: Image.Image, level: float, negate: bool) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, level: float, negate: bool) -> Image.Image:
    return ImageOps.equalize(img)


def _brightness(img: Image.Image, level: float, negate: bool) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(enhance_factor(level))


def _sharpness(img: Image.Image, level: float, negate: bool) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(enhance_factor(level))


def _shear_x(img: Image.Image, level: float, negate: bool) -> Image.Image:
    s = level / MAX_LEVEL * 0.3 * (-1.0 if negate else 1.0)  # shear factor (tan of the angle)
    return _affine(img, (1.0, s, 0.0, 0.0, 1.0, 0.0))


def _shear_y(img: Image.Image, level: float, negate: bool) -> Image.Image:
    s = level / MAX_LEVEL * 0.3 * (-1.0 if negate else 1.0)
    return _affine(img, (1.0, 0.0, 0.0, s, 1.0, 0.0))


def _translate_x(img: Image.Image, level: float, negate: bool) -> Image.Image:
    t = level / MAX_LEVEL * TRANSLATE_CONST * (-1.0 if negate else 1.0)  # pixels
    return _affine(img, (1.0, 0.0, t, 0.0, 1.0, 0.0))


def _translate_y(img: Image.Image, level: float, negate: bool) -> Image.Image:
    t = level / MAX_LEVEL * TRANSLATE_CONST * (-1.0 if negate else 1.0)
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, t))


def _rotate(img: Image.Image, level: float, negate: bool) -> Image.Image:
    angle = level / MAX_LEVEL * 30.0 * (-1.0 if negate else 1.0)  # degrees, about the centre
    return img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=FILL)


# name -> op(img, level, negate); the op set of ALBEF's RandomAugment, in a fixed order (sampling indexes it).
RANDAUG_OPS: dict[str, Callable[[Image.Image, float, bool], Image.Image]] = {
    "Identity": _identity,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}


def apply_op(img: Image.Image, name: str, level: float, negate: bool = False) -> Image.Image:
    """Apply one RandAugment op by name at `level` (0..10); `negate` flips the sign of signed magnitudes."""
    try:
        op = RANDAUG_OPS[name]
    except KeyError:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RANDAUG_OPS)}") from None
    return op(img, float(level), negate)


class RandomAugment:
    """ALBEF's RandAugment: `n` ops drawn uniformly with replacement, each applied with probability 0.5."""

    OPS = tuple(RANDAUG_OPS)

    def __init__(self, n: int = 2, m: int = 7) -> None:
        if n < 0:
            raise ValueError(f"RandomAugment n must be >= 0, got {n}")
        if not 0 <= m <= MAX_LEVEL:
            raise ValueError(f"RandomAugment m must lie in [0, {MAX_LEVEL:g}], got {m}")
        self.n = n
        self.m = m

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.n == 0:
            return img
        # Draw all random numbers at once (one RNG call per kind): op indices [n], apply coin [n], sign [n].
        idx = torch.randint(len(self.OPS), (self.n,)).tolist()
        apply = (torch.rand(self.n) < 0.5).tolist()
        negate = (torch.rand(self.n) < 0.5).tolist()
        for i, a, s in zip(idx, apply, negate):
            if a:
                img = RANDAUG_OPS[self.OPS[i]](img, self.m, s)
        return img

    def __repr__(self) -> str:
        return f"RandomAugment(n={self.n}, m={self.m})"


def _to_normalized_tensor() -> list:
    # PIL [H, W, 3] uint8 -> FloatTensor [3, H, W] in [0, 1] -> CLIP-normalised.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD)]


class _ToPlainTensor:
    """Strip torchvision's `tv_tensors.Image` subclass so batches are plain tensors (cheaper to collate)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.as_subclass(torch.Tensor)


def pretrain_transform(
    image_size: int,
    *,
    crop_scale: tuple[float, float] | list[float] = (0.2, 1.0),
    hflip: bool = True,
    randaug_n: int = 2,
    randaug_m: int = 7,
) -> v2.Compose:
    """PIL image -> FloatTensor [3, S, S]: random resized crop, flip, RandAugment, CLIP normalisation."""
    lo, hi = crop_scale
    ops: list = [v2.RandomResizedCrop(image_size, scale=(lo, hi), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if randaug_n > 0:
        ops.append(RandomAugment(randaug_n, randaug_m))
    return v2.Compose(ops + _to_normalized_tensor() + [_ToPlainTensor()])


def eval_transform(image_size: int) -> v2.Compose:
    """PIL image -> FloatTensor [3, S, S]: bicubic resize to S x S (no crop), CLIP normalisation."""
    ops = [v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)]
    return v2.Compose(ops + _to_normalized_tensor() + [_ToPlainTensor()])


def split_at_crop(image_size: int, aug: dict) -> tuple[v2.RandomResizedCrop, v2.Compose, v2.Compose]:
    """The pre-training transform without its flip, cut after its crop, for samples whose flip the text
    must know (VQA, NLVR2): (whole transform, crop, the rest: RandAugment + normalisation); the caller
    draws the flip and applies it between the two. `aug`: `pretrain_transform`'s keywords."""
    transform = pretrain_transform(image_size, **{**aug, "hflip": False})
    crop, *rest = transform.transforms
    if not isinstance(crop, v2.RandomResizedCrop):
        raise RuntimeError(f"pretrain_transform no longer starts with its crop: {transform}")
    return transform, crop, v2.Compose(rest)
