"""NVIDIA DALI image pipelines: decode and augment on the GPU (`device='mixed'`) or on CPU threads.

Design (what makes the loader reproducible, resumable and crash-proof):

* **Order** comes from `ShardedEpochSampler` (seeded per-epoch shuffle, disjoint per-rank shares whose
  union is the epoch, `set_start` to skip the batches a resumed run has already trained on). DALI's own
  readers and checkpointing are not used: the same sampler drives the reference loader, so both loaders
  see the same samples in the same order and resume the same way.
* **Random draws** (caption choice, crop window, flip, RandAugment ops, signs) are made on the host from an
  RNG seeded by (seed, epoch, sample index) and fed to the pipeline as per-sample tensors; DALI only
  computes. A sample's view therefore depends on nothing else: same seed -> same batch, and a resumed run
  sees exactly the views an uninterrupted one would.
* **Bad input never reaches the decoder, and the usable images are the torch loader's**: host threads
  (`num_threads`) read each file and apply `sources.check_image`, the one usability rule of both loaders,
  `data shard` and `data validate` (header checks, PNG CRCs, a full PIL decode: about 2-3 ms per 640x480
  JPEG per thread); a refused sample is skipped, its batch filled up from the next samples of the rank's
  order (`sampler.refill_batches`) and counted in `num_skipped`. Formats DALI would decode differently from
  PIL (16-bit PNG, GIF, TIFF, ...) are handed over as PIL's pixels (BMP). Captions are cleaned and
  tokenised there too, one batch ahead of the training thread. Should the decoder still fail on a batch,
  the batch is re-run sample by sample on a fresh pipeline, a failing image is fed again as PIL's pixels
  (BMP), and only an image that fails even so is dropped (the batch is then short by it, counted).
* **The text side is a hook object** (`CaptionText`, the default: one caption per image). It draws a
  sample's text before the crop window, finishes it once the flip is known (VQA swaps left/right in a
  flipped sample's question and answers: `vqa.VQAText`) and turns a batch's texts into tensors, so another
  kind of sample reuses the loader's reading, drawing, prefetching and failure handling unchanged. A kind
  with several images per sample (NLVR2's pairs: `nlvr.NLVRText`) also says how many (`images_per_sample`),
  reads them (`read_images`) and draws their order and flips (`draw_flip`); the pipeline then runs on the
  n x B images of a batch, each with its own crop, flip and RandAugment feeds, and a sample is kept only
  when all its images decoded.

Training transform: random resized crop (scale `crop_scale`, ratio 3/4-4/3, torchvision's 10-try
algorithm; only the crop window is decoded: `decoders.image_slice`), bicubic antialiased resize to S x S,
horizontal flip, ALBEF's RandAugment (N ops drawn with replacement from the 10 of `transforms.RandomAugment`,
each applied with probability 0.5, magnitude M), CLIP normalisation, NCHW. Evaluation transform: bicubic
resize to S x S, CLIP normalisation.

RandAugment ops in DALI (the parameters are `transforms.py`'s; checked op by op against the PIL reference):
Identity; AutoContrast (per-channel min/max stretch, arithmetic ops); Brightness (`fn.brightness`);
Sharpness (3x3 smoothing kernel of PIL's SMOOTH filter via `fn.filter`, then the blend; border
pixels are clamped where PIL keeps them unfiltered); ShearX/Y, TranslateX/Y and Rotate as one
`fn.warp_affine` with the host-computed PIL inverse matrix (bilinear, grey fill). DALI has no PIL-style
Equalize: `fn.equalize` (OpenCV's histogram equalisation: cumulative-histogram LUT) replaces
PIL's step-based LUT; both flatten the histogram, pixel values differ by a few levels.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batch import empty_batch
from .sampler import ShardedEpochSampler, refill_batches, sample_seed
from .sources import DEFAULT_MAX_PIXELS, BadImage, ImageTextSource, decode_checked, decode_rgb
from .text import TextTokenizer, clean_caption
from .transforms import CLIP_MEAN, CLIP_STD, MAX_LEVEL, TRANSLATE_CONST, RandomAugment, enhance_factor

logger = logging.getLogger(__name__)

# Op codes of the DALI graph (several RandAugment ops share the affine branch).
OP_IDENTITY, OP_AUTOCONTRAST, OP_EQUALIZE, OP_BRIGHTNESS, OP_SHARPNESS, OP_AFFINE = range(6)
_IDENTITY_MAT = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0  # PIL ImageFilter.SMOOTH


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _require_dali():
    try:
        import nvidia.dali as dali
    except ImportError as e:
        raise RuntimeError(
            "data.loader = dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (in requirements.txt), "
            "or set data.loader=torch"
        ) from e
    return dali


# --------------------------------------------------------------------------------- host-side random draws
def rrc_params(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window: (top, left, crop height, crop width)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: the largest centred crop within the ratio range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _rotation_matrix(angle_deg: float, size: int) -> np.ndarray:
    # PIL's Image.rotate inverse map (output -> input pixel) about the centre (size/2, size/2).
    a = -math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    cx = cy = size / 2.0
    tx = c * -cx + s * -cy + cx
    ty = -s * -cx + c * -cy + cy
    return np.array([[c, s, tx], [-s, c, ty]], np.float32)


def op_params(name: str, level: float, negate: bool, size: int) -> tuple[int, np.ndarray, float]:
    """One RandAugment op -> (op code, [2, 3] inverse affine matrix, enhance factor) for the DALI graph."""
    sign = -1.0 if negate else 1.0
    mat = _IDENTITY_MAT.copy()
    if name == "Identity":
        return OP_IDENTITY, mat, 1.0
    if name == "AutoContrast":
        return OP_AUTOCONTRAST, mat, 1.0
    if name == "Equalize":
        return OP_EQUALIZE, mat, 1.0
    if name == "Brightness":
        return OP_BRIGHTNESS, mat, enhance_factor(level)
    if name == "Sharpness":
        return OP_SHARPNESS, mat, enhance_factor(level)
    if name == "ShearX":
        mat[0, 1] = level / MAX_LEVEL * 0.3 * sign
    elif name == "ShearY":
        mat[1, 0] = level / MAX_LEVEL * 0.3 * sign
    elif name == "TranslateX":
        mat[0, 2] = level / MAX_LEVEL * TRANSLATE_CONST * sign
    elif name == "TranslateY":
        mat[1, 2] = level / MAX_LEVEL * TRANSLATE_CONST * sign
    elif name == "Rotate":
        mat = _rotation_matrix(level / MAX_LEVEL * 30.0 * sign, size)
    else:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RandomAugment.OPS)}")
    return OP_AFFINE, mat, 1.0


def randaug_params(
    rng: np.random.Generator, n: int, m: float, size: int
) -> list[tuple[int, np.ndarray, float]]:
    """ALBEF's RandAugment draws for one image: n slots, each an op (uniform, with replacement) applied
    with probability 0.5 with a random sign; an op not applied is the identity."""
    ops = RandomAugment.OPS
    idx = rng.integers(0, len(ops), size=n)
    apply = rng.random(n) < 0.5
    negate = rng.random(n) < 0.5
    return [
        op_params(ops[i], m, bool(s), size) if a else op_params("Identity", 0, False, size)
        for i, a, s in zip(idx.tolist(), apply.tolist(), negate.tolist())
    ]


# ------------------------------------------------------------------------------------------ DALI graphs
def _dali_device_id(device: torch.device) -> int | None:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    if device.type != "cpu":
        raise ValueError(f"DALI pipelines run on CPU or CUDA devices, not {device}")
    return None


def _normalize(img):
    """uint8 HWC -> CLIP-normalised float32 CHW (inside a pipeline definition)."""
    from nvidia.dali import fn, types

    mean = [255.0 * v for v in CLIP_MEAN]
    std = [255.0 * v for v in CLIP_STD]
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)


def _pipeline_kwargs(batch_size: int, num_threads: int, device_id: int | None) -> dict:
    # Fed and run one batch at a time from Python (external sources): no DALI-side prefetch queue.
    return {
        "batch_size": batch_size,
        "num_threads": num_threads,
        "device_id": device_id,
        "prefetch_queue_depth": 1,
        "exec_async": False,
        "exec_pipelined": False,
    }


def build_train_pipeline(
    *, batch_size: int, num_threads: int, device: torch.device, image_size: int, hflip: bool, randaug_n: int
):
    """The training graph. Per-sample inputs: encoded (uint8 [N]), anchor/shape (float [2]: y, x / h, w of
    the crop window), flip (int32), op<j> (int32), mat<j> (float [2, 3]), fac<j> (float) for each RandAugment
    slot j. Output: float32 [B, 3, S, S] CLIP-normalised, on `device`."""
    dali = _require_dali()
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    device_id = _dali_device_id(device)
    decoder_device = "mixed" if device_id is not None else "cpu"

    @dali.pipeline_def(
        enable_conditionals=randaug_n > 0, **_pipeline_kwargs(batch_size, num_threads, device_id)
    )
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)
        img = fn.decoders.image_slice(
            encoded,
            anchor,
            shape,
            axes=[0, 1],
            normalized_anchor=False,
            normalized_shape=False,
            output_type=types.RGB,
            adjust_orientation=False,  # PIL (the reference) ignores EXIF orientation too
            device=decoder_device,
        )
        img = fn.resize(img, size=[image_size, image_size], interp_type=types.INTERP_CUBIC, antialias=True)
        if hflip:
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            img = fn.flip(img, horizontal=flip)
        for j in range(randaug_n):
            op = fn.external_source(name=f"op{j}", dtype=types.INT32, ndim=0)
            mat = fn.external_source(name=f"mat{j}", dtype=types.FLOAT, ndim=2)
            fac = fn.external_source(name=f"fac{j}", dtype=types.FLOAT, ndim=0)
            if op == OP_AUTOCONTRAST:
                lo = fn.cast(fn.reductions.min(img, axes=[0, 1]), dtype=types.FLOAT)  # [3]
                hi = fn.cast(fn.reductions.max(img, axes=[0, 1]), dtype=types.FLOAT)
                f = fn.cast(img, dtype=types.FLOAT)
                stretched = dmath.floor((f - lo) * (255.0 / dmath.max(hi - lo, 1.0)))
                keep = fn.cast(hi <= lo, dtype=types.FLOAT)  # a flat channel is left as it is
                img = fn.cast(dmath.clamp(stretched + keep * (f - stretched), 0.0, 255.0), dtype=types.UINT8)
            elif op == OP_EQUALIZE:
                img = fn.equalize(img)
            elif op == OP_BRIGHTNESS:
                img = fn.brightness(img, brightness=fac)
            elif op == OP_SHARPNESS:
                smooth = fn.filter(img, _SMOOTH, dtype=types.FLOAT, border="clamp")
                sharp = smooth + fac * (fn.cast(img, dtype=types.FLOAT) - smooth)
                img = fn.cast(dmath.clamp(dmath.floor(sharp + 0.5), 0.0, 255.0), dtype=types.UINT8)
            elif op == OP_AFFINE:
                img = fn.warp_affine(
                    img, matrix=mat, fill_value=128, interp_type=types.INTERP_LINEAR, inverse_map=True
                )
            else:
                img = img
        return _normalize(img)

    pipe = graph()
    pipe.build()
    return pipe


def build_eval_pipeline(*, batch_size: int, num_threads: int, device: torch.device, image_size: int):
    """The evaluation graph: encoded (uint8 [N]) -> bicubic resize to S x S -> CLIP-normalised
    [B, 3, S, S]."""
    dali = _require_dali()
    from nvidia.dali import fn, types

    device_id = _dali_device_id(device)

    @dali.pipeline_def(**_pipeline_kwargs(batch_size, num_threads, device_id))
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        img = fn.decoders.image(
            encoded,
            output_type=types.RGB,
            adjust_orientation=False,
            device="mixed" if device_id is not None else "cpu",
        )
        img = fn.resize(img, size=[image_size, image_size], interp_type=types.INTERP_CUBIC, antialias=True)
        return _normalize(img)

    pipe = graph()
    pipe.build()
    return pipe


def _short(e: BaseException) -> str:
    """The useful line of a DALI error (its message repeats the whole pipeline definition)."""
    msg = str(e)
    if "encountered:" in msg:
        msg = msg.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A uniform DALI TensorList -> a new torch tensor on `device` (copied: DALI reuses its buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tensor_list.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(t, out, cuda_stream=stream)
    return out


# ------------------------------------------------------------------------------------------ the loaders
@dataclass
class _Prepared:
    """One batch, ready for the pipeline: per-sample feeds and the text side."""

    feeds: dict[str, list[np.ndarray]]
    index: list[int]
    idx: list[int]
    names: list[str]
    text: Any  # the text side's `encode` of the kept samples' texts; None when no sample was kept
    skipped: int


def dali_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """Encoded image -> (uint8 bytes DALI decodes to PIL's pixels, width, height); BadImage when
    `sources.check_image` refuses it (the torch loader's rule: both loaders train on the same images).
    Formats DALI would decode differently (16-bit PNG, GIF, TIFF, ...) are handed over as PIL's pixels,
    losslessly as BMP."""
    check, img = decode_checked(data, max_pixels)  # the one rule the torch loader applies too
    if img is None:
        raise BadImage(check.reason)
    if not check.dali_native:
        data = _bmp(img)
    return np.frombuffer(data, dtype=np.uint8), check.width, check.height


def _bmp(img) -> bytes:
    """A PIL image as BMP bytes: DALI decodes them to exactly its pixels."""
    buf = io.BytesIO()
    img.save(buf, format="BMP")
    return buf.getvalue()


class CaptionText:
    """The text side of `DaliImageTextLoader` for image-text pairs: one cleaned caption per image, tokenised.

    The loader calls, on its prefetch thread, `draw(source, i, rng)` for each usable sample before it draws
    the crop window from `rng` (the sample's generator; here: the caption choice when an entry has several),
    `finish(draft, flipped)` once the flip is drawn (must not draw), and `encode(texts)` on the finished texts
    of a batch; on the training thread `tensors(encoded, rows)`, the batch's text tensors for the rows whose
    image the pipeline decoded, and `empty()`, the keys a batch with no sample adds to `batch.empty_batch`'s.
    Another kind of sample (`vqa.VQAText`) implements the same five methods.

    Optional, for n > 1 images per sample (`nlvr.NLVRText`): `images_per_sample` (n; absent = 1),
    `read_images(source, i)` (the n encoded images of sample i; OSError when one cannot be read) and
    `draw_flip(rng, hflip)` -> (order, mirrors, state), drawn after the n crop windows: output image j is
    input image order[j], mirrored when mirrors[j]; `finish` gets `state` instead of the flip. Absent, the
    loader draws one flip with p = 0.5 when `hflip` and passes it to `finish`.
    """

    def __init__(self, tokenizer: TextTokenizer, max_words: int) -> None:
        self.tokenizer = tokenizer
        self.max_words = max_words

    def draw(self, source: ImageTextSource, i: int, rng: np.random.Generator) -> str:
        cap = source.caption(i)
        if isinstance(cap, tuple):
            cap = cap[int(rng.integers(0, len(cap)))]
        return cap

    def finish(self, caption: str, flipped: bool) -> str:
        return clean_caption(caption, self.max_words)

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(captions)  # input_ids / attention_mask [B, L]

    def tensors(self, encoded: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        sel = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": encoded["input_ids"][sel], "attention_mask": encoded["attention_mask"][sel]}

    def empty(self) -> dict:
        return {}  # empty_batch already holds input_ids / attention_mask


class DaliImageTextLoader:
    """Training batches from a DALI pipeline in the project's batch format.

    Iterating yields ``{"image": float [B, 3, S, S] on `device` in `dtype`, "input_ids", "attention_mask":
    long [B, L], "index": long [B], "num_skipped": int}`` (+ ``"idx"``: long [B] image ids when `with_idx`)
    for the sampler's current epoch and start (`sampler.set_epoch`, `sampler.set_start`): exactly
    `sampler.batches_per_epoch` batches (less the start) of B = batch_size, refilled from the next samples
    of the rank's order after unusable ones (B < batch_size only when DALI and the PIL fallback both fail).
    `text` replaces the caption side (`CaptionText(tokenizer, max_words)`) by another text side; its
    `tensors` then give the batch's keys between "image" and "index". A text side with
    n = `images_per_sample` > 1 replaces "image" by "image0" .. "image<n-1>" (each [B, 3, S, S]).
    """

    def __init__(
        self,
        source: ImageTextSource,
        sampler: ShardedEpochSampler,
        tokenizer: TextTokenizer,
        *,
        image_size: int,
        batch_size: int,
        seed: int,
        max_words: int,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
        randaug_n: int = 2,
        randaug_m: int = 7,
        num_threads: int = 2,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        with_idx: bool = False,
        prefetch: int = 2,
        text: Any = None,
    ) -> None:
        _require_dali()
        if len(source) != sampler.num_samples:
            raise ValueError(f"sampler covers {sampler.num_samples} samples but the source has {len(source)}")
        self.source = source
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.seed = seed
        self.max_words = max_words
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = hflip
        self.randaug_n = randaug_n
        self.randaug_m = randaug_m
        self.num_threads = max(1, num_threads)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_pixels = max_pixels
        self.with_idx = with_idx
        self.prefetch = max(1, prefetch)
        self.text = CaptionText(tokenizer, max_words) if text is None else text
        self.images_per_sample = int(getattr(self.text, "images_per_sample", 1))  # n images per sample
        if self.images_per_sample < 1:
            raise ValueError(f"images_per_sample must be >= 1, got {self.images_per_sample}")
        self._pipe = None

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch - self.sampler.start_batch

    # -- host side (runs on the prefetch thread) --
    def _read(self, i: int) -> list[tuple[np.ndarray, int, int]]:
        """Sample i's n images as (DALI bytes, width, height); OSError / BadImage when one is unusable."""
        if self.images_per_sample == 1:
            return [dali_bytes(self.source.read(i), self.max_pixels)]
        data = self.text.read_images(self.source, i)
        if len(data) != self.images_per_sample:
            raise RuntimeError(
                f"read_images gave {len(data)} images for sample {i}, not {self.images_per_sample}"
            )
        return [dali_bytes(d, self.max_pixels) for d in data]

    def _draw_flip(self, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[bool, ...], Any]:
        """(order, mirrors, state for `text.finish`) of one sample, see `CaptionText`."""
        draw = getattr(self.text, "draw_flip", None)
        if draw is not None:
            return draw(rng, self.hflip)
        flipped = bool(rng.random() < 0.5) if self.hflip else False
        return (0,), (flipped,), flipped

    def _usable(self, i: int) -> list[tuple[np.ndarray, int, int]] | None:
        """`_read`, or None (logged) when an image of sample i is unusable."""
        try:
            return self._read(i)
        except (OSError, BadImage) as e:
            logger.warning("skipping image %s (index %d): %s", self.source.name(i), i, e)
            return None

    def _prepare(
        self, samples: list[tuple[int, list[tuple[np.ndarray, int, int]]]], epoch: int, skipped: int
    ) -> _Prepared:
        """Feeds and texts of a batch of usable samples ((index, `_read`'s images)); `skipped`: the unusable
        samples the batch consumed."""
        feeds: dict[str, list[np.ndarray]] = {"encoded": [], "anchor": [], "shape": []}
        if self.hflip:
            feeds["flip"] = []
        for j in range(self.randaug_n):
            feeds[f"op{j}"], feeds[f"mat{j}"], feeds[f"fac{j}"] = [], [], []
        kept, idx, names, texts = [], [], [], []
        for i, images in samples:
            rng = np.random.default_rng(sample_seed(self.seed, epoch, i))
            draft = self.text.draw(self.source, i, rng)
            # Draw order: text, the crop window of each image, the flips, each output image's RandAugment.
            windows = [rrc_params(rng, w, h, self.crop_scale) for _, w, h in images]
            order, mirrors, state = self._draw_flip(rng)
            for k, mirrored in zip(order, mirrors, strict=True):  # the pipeline's rows: n per sample
                top, left, ch, cw = windows[k]
                feeds["encoded"].append(images[k][0])
                feeds["anchor"].append(np.array([top, left], np.float32))
                feeds["shape"].append(np.array([ch, cw], np.float32))
                if self.hflip:
                    feeds["flip"].append(np.array(int(mirrored), np.int32))
                elif mirrored:
                    raise RuntimeError("draw_flip asked for a mirrored image with hflip off (no flip input)")
            for _ in order:
                for j, (code, mat, fac) in enumerate(
                    randaug_params(rng, self.randaug_n, self.randaug_m, self.image_size)
                ):
                    feeds[f"op{j}"].append(np.array(code, np.int32))
                    feeds[f"mat{j}"].append(mat)
                    feeds[f"fac{j}"].append(np.array(fac, np.float32))
            kept.append(i)
            idx.append(self.source.image_id(i))
            names.append(self.source.name(i))
            texts.append(self.text.finish(draft, state))
        encoded = self.text.encode(texts) if texts else None
        return _Prepared(feeds, kept, idx, names, encoded, skipped)

    # -- device side (training thread) --
    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_train_pipeline(
                batch_size=self.batch_size * self.images_per_sample,
                num_threads=self.num_threads,
                device=self.device,
                image_size=self.image_size,
                hflip=self.hflip,
                randaug_n=self.randaug_n,
            )
        return self._pipe

    def _run(self, feeds: dict[str, list[np.ndarray]], rows: list[int]) -> torch.Tensor:
        pipe = self._pipeline()
        for name, values in feeds.items():
            pipe.feed_input(name, [values[r] for r in rows])
        (out,) = pipe.run()
        return _to_torch(out, self.device)

    def _images(self, prep: _Prepared) -> tuple[torch.Tensor, list[int]]:
        """Run the pipeline on a prepared batch -> (images [n x kept, 3, S, S], sample rows kept: those whose
        n images all decoded); isolates decoder failures."""
        n = self.images_per_sample
        samples = list(range(len(prep.index)))
        rows = list(range(n * len(samples)))  # image rows: sample s owns rows n*s .. n*s + n-1
        try:
            return self._run(prep.feeds, rows), samples
        except RuntimeError as e:
            logger.warning(
                "DALI failed on a batch (%s); retrying its %d images one by one", str(e)[:200], len(rows)
            )
        self._pipe = None  # a pipeline that raised is no longer usable
        parts: dict[int, torch.Tensor] = {}
        for r in rows:
            try:
                parts[r] = self._run(prep.feeds, [r])
                continue
            except RuntimeError as e:
                self._pipe = None
                why = str(e)[:200]
            # check_image accepted this image, so the torch loader trains on it: feed PIL's pixels instead.
            try:
                pixels = decode_rgb(prep.feeds["encoded"][r].tobytes(), self.max_pixels)
                prep.feeds["encoded"][r] = np.frombuffer(_bmp(pixels), np.uint8)
                parts[r] = self._run(prep.feeds, [r])
                logger.warning(
                    "image %s (index %d): DALI failed (%s); decoded by PIL instead",
                    prep.names[r // n],
                    prep.index[r // n],
                    why,
                )
            except (RuntimeError, BadImage) as e:
                self._pipe = None
                logger.warning(
                    "skipping image %s (index %d): DALI: %s; PIL fallback: %s",
                    prep.names[r // n],
                    prep.index[r // n],
                    why,
                    str(e)[:200],
                )
        kept = [s for s in samples if all(n * s + k in parts for k in range(n))]
        if not kept:
            return torch.zeros((0, 3, self.image_size, self.image_size), device=self.device), kept
        return torch.cat([parts[n * s + k] for s in kept for k in range(n)]), kept

    def _image_keys(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """[n x B, 3, S, S] (n rows per sample) -> {"image": [B, ...]} or {"image0": .., "image<n-1>": ..}."""
        n = self.images_per_sample
        if n == 1:
            return {"image": images}
        return {f"image{k}": images[k::n].contiguous() for k in range(n)}

    def _batch(self, prep: _Prepared) -> dict:
        if not prep.index:
            empty = torch.zeros(
                (0, 3, self.image_size, self.image_size), device=self.device, dtype=self.dtype
            )
            out = empty_batch(prep.skipped, empty, self.with_idx)
            return {**self._image_keys(out.pop("image")), **out, **self.text.empty()}
        images, rows = self._images(prep)
        skipped = prep.skipped + len(prep.index) - len(rows)
        sel = torch.tensor(rows, dtype=torch.long)
        batch = {
            **self._image_keys(images.to(self.dtype)),
            **self.text.tensors(prep.text, rows),
            "index": torch.tensor(prep.index, dtype=torch.long)[sel],
            "num_skipped": skipped,
        }
        if self.with_idx:
            batch["idx"] = torch.tensor(prep.idx, dtype=torch.long)[sel]
        return batch

    def _checked(self, pool: ThreadPoolExecutor) -> Iterator[tuple[int, Any]]:
        """(index, `_usable(index)`) along the sampler's stream, read and checked batch_size at a time on
        the pool's threads (PIL releases the GIL while it decodes), in stream order."""
        stream = self.sampler.stream()
        while True:
            chunk = [next(stream) for _ in range(self.batch_size)]
            yield from zip(chunk, pool.map(self._usable, chunk))

    def __iter__(self) -> Iterator[dict]:
        epoch, n = self.sampler.epoch, len(self)
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                with ThreadPoolExecutor(self.num_threads, thread_name_prefix="dali-check") as pool:
                    checked = self._checked(pool)
                    batches = refill_batches(checked, self.batch_size, n, limit=self.sampler.per_rank)
                    for samples, skipped in batches:
                        if stop.is_set():
                            return
                        item = self._prepare(samples, epoch, skipped)
                        while not stop.is_set():
                            try:
                                q.put(item, timeout=0.1)
                                break
                            except queue.Full:
                                continue
            except BaseException as e:  # surfaced on the training thread
                q.put(e)
                return
            q.put(None)

        worker = threading.Thread(target=produce, name="dali-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._batch(item)
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)


class DaliEvalImages:
    """Evaluation images through the DALI eval graph: iterating yields (float [B, 3, S, S], LongTensor [B]
    image indices). An unusable image is an error (a skipped eval image would shift every recall)."""

    def __init__(
        self,
        paths: list[str],
        *,
        image_size: int,
        batch_size: int,
        num_threads: int = 2,
        device: torch.device | str = "cpu",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        _require_dali()
        self.paths = list(paths)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_threads = max(1, num_threads)
        self.device = torch.device(device)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def _encoded(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                return dali_bytes(f.read(), self.max_pixels)[0]
        except (OSError, BadImage) as e:
            raise RuntimeError(f"evaluation image {path} (image {i}) could not be read: {e}") from e

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = build_eval_pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device=self.device,
            image_size=self.image_size,
        )
        for k in range(0, len(self.paths), self.batch_size):
            ids = list(range(k, min(k + self.batch_size, len(self.paths))))
            pipe.feed_input("encoded", [self._encoded(i) for i in ids])
            (out,) = pipe.run()
            yield _to_torch(out, self.device), torch.tensor(ids, dtype=torch.long)
