"""NLVR2 data in the ALBEF JSON layout: records, the pair flip, the training loader (both backends) and the
evaluation set.

Records: a JSON list of ::

    {"images": [left, right] (two str paths), "sentence": str, "label": "True" | "False" (or a bool)}

Image paths are relative to `image_root` ("" = the JSON file's folder; an absolute path is kept). Label
"True" is class 1, "False" class 0. An optional str field "truth_type" (the synthetic set's template kind)
is kept for per-type scores. Every format error names the file, the entry and the field.

The NLVR2 batch format (`build_nlvr_train_loader`, both backends)::

    {"image0": float [B, 3, S, S], "image1": float [B, 3, S, S]   the left and right image (training dtype;
                                                                  DALI: on the training device),
     "input_ids": long [B, L], "attention_mask": long [B, L]      the cleaned sentences, tokenised,
     "label": long [B],                                           1 = True, 0 = False
     "index": long [B],                                           record numbers (train files concatenated),
     "num_skipped": int}                                          pairs dropped: either image unusable

Training transform: each image gets the fine-tuning augmentation of data (random resized crop with
data.crop_scale, RandAugment, CLIP normalisation) with its own draws from the sample's RNG (seeded by seed,
epoch and index, as every loader does). The horizontal flip (when data.hflip) is drawn by `pair_flip`,
shared by both backends: with nlvr.flip_swap the whole pair is mirrored with p = 0.5 (the two images swap
places, each is mirrored, and the sentence swaps "left" and "right": `vqa.swap_left_right`), so "the left
image ..." and "... on the left of the image" both stay true; without it each image is flipped on its own
with p = 0.5 and the text never changes (the reference's behaviour, which makes left/right statements false).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from .annotations import read_json_list
from .batch import empty_batch
from .datasets import ImageTextDataset
from .evalset import eval_image_batches
from .loaders import TextSideSamples, build_train_loader
from .sources import DEFAULT_MAX_PIXELS, BadImage, ImageTextSource, JsonListSource, decode_rgb
from .text import TextTokenizer, clean_caption
from .transforms import split_at_crop
from .ve import SentenceLabelText, check_type_field
from .vqa import swap_left_right

logger = logging.getLogger(__name__)

NLVR_LABELS = {"False": 0, "True": 1}


# ---------------------------------------------------------------------------------------------- records
def _nlvr_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value in NLVR_LABELS:
        return NLVR_LABELS[value]
    raise ValueError(f"{where}: field 'label' must be 'True' or 'False' (or a bool), got {value!r:.80}")


def load_nlvr_records(path: str | Path, *, image_root: str = "") -> list[dict]:
    """Read and check an NLVR2 JSON list. Returns one dict per record: "images" ([left, right] absolute
    paths), "sentence" (as given), "label" (1 = True, 0 = False), "type" (the optional "truth_type" str, None
    when absent)."""
    p = Path(path)
    data = read_json_list(p, what="NLVR2 file", non_empty=True)
    root = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(p))
    out = []
    for i, e in enumerate(data):
        where = f"NLVR2 file {p}: entry {i}"
        if not isinstance(e, dict):
            raise ValueError(
                f"{where} must be an object with images, sentence, label; got {type(e).__name__}"
            )
        for key in ("images", "sentence", "label"):
            if key not in e:
                raise ValueError(f"{where} has no field '{key}' (records need images, sentence, label)")
        images = e["images"]
        if not (
            isinstance(images, list) and len(images) == 2 and all(isinstance(x, str) and x for x in images)
        ):
            raise ValueError(
                f"{where}: field 'images' must be a list of exactly 2 non-empty str (left, right), got "
                f"{images!r:.80}"
            )
        if not isinstance(e["sentence"], str):
            raise ValueError(f"{where}: field 'sentence' must be a str, got {type(e['sentence']).__name__}")
        out.append(
            {
                "images": [os.path.join(root, x) for x in images],  # join keeps an absolute path as it is
                "sentence": e["sentence"],
                "label": _nlvr_label(e["label"], where),
                "type": check_type_field(e, "truth_type", where),
            }
        )
    return out


# ------------------------------------------------------------------------------------------- the flip
def pair_flip(rng: Any, *, hflip: bool, flip_swap: bool) -> tuple[tuple[int, int], tuple[bool, bool], bool]:
    """The flip of one pair, drawn from `rng` (anything with `.random()`: the sample's `random.Random` in
    the torch backend, its numpy Generator in DALI) -> (order, mirrors, swapped): output image j is input
    image order[j], mirrored when mirrors[j]; `swapped`: the text must swap left and right.

    hflip off: no flip, nothing drawn. flip_swap: one draw; p = 0.5 the mirror of the whole pair (order
    (1, 0), both mirrored, swapped). Otherwise two draws, each image mirrored on its own with p = 0.5, the
    order and the text kept."""
    if not hflip:
        return (0, 1), (False, False), False
    if flip_swap:
        if rng.random() < 0.5:
            return (1, 0), (True, True), True
        return (0, 1), (False, False), False
    return (0, 1), (bool(rng.random() < 0.5), bool(rng.random() < 0.5)), False


# --------------------------------------------------------------------------------------------- training
class NLVRSource(JsonListSource):
    """Training records as a source for the sampler and both backends: `read_images(i)` the two encoded
    images (left, right), `paths(i)` their paths, `example(i)` the (sentence, class), `caption(i)` the raw
    sentence, `name(i)` both paths (for messages); `read(i)` is the left image."""

    def __init__(self, records: list[dict]) -> None:
        # JsonListSource stores its entries packed (cheap to share with forked workers); the class and the
        # right image travel in the caption tuple after the sentence.
        entries = [
            {"image": r["images"][0], "caption": [r["sentence"], r["label"], r["images"][1]]} for r in records
        ]
        super().__init__(entries)

    def example(self, i: int) -> tuple[str, int]:
        sentence, label, _ = super().caption(i)
        return sentence, int(label)

    def caption(self, i: int) -> str:
        return super().caption(i)[0]

    def paths(self, i: int) -> tuple[str, str]:
        return super().name(i), super().caption(i)[2]

    def read_images(self, i: int) -> list[bytes]:
        """The two encoded images; OSError (naming the file) when one cannot be read."""
        out = []
        for path in self.paths(i):
            with open(path, "rb") as f:
                out.append(f.read())
        return out

    def name(self, i: int) -> str:
        return " + ".join(self.paths(i))


class NLVRText(SentenceLabelText):
    """The text side of an NLVR2 pair for both backends (the DALI hook protocol of `dali.CaptionText`, two
    images per sample): `SentenceLabelText`, plus the pair's reading and flip (`pair_flip`); `finish` swaps
    left and right in the sentence of a swapped pair."""

    images_per_sample = 2

    def __init__(self, tokenizer: TextTokenizer, *, max_words: int, flip_swap: bool) -> None:
        super().__init__(tokenizer, max_words=max_words)
        self.flip_swap = flip_swap

    def read_images(self, source: NLVRSource, i: int) -> list[bytes]:
        return source.read_images(i)

    def draw_flip(self, rng: Any, hflip: bool) -> tuple[tuple[int, int], tuple[bool, bool], bool]:
        return pair_flip(rng, hflip=hflip, flip_swap=self.flip_swap)

    def finish(self, example: tuple[str, int], swapped: bool) -> tuple[str, int]:
        sentence, label = super().finish(example, swapped)
        return (swap_left_right(sentence) if swapped else sentence), label


class NLVRTrainDataset(ImageTextDataset):
    """The torch backend: `__getitem__(i)` -> ``{"images": [FloatTensor [3, S, S]] * 2 (left, right after
    the flip), "text": (sentence, class) of `NLVRText.finish`, "index": i}``, or None when either image
    cannot be used (logged with its path). Seeded per sample as `ImageTextDataset`: the two crops and the
    RandAugment draws come from torch's per-sample generator, the flip from the sample's `random.Random`
    (`pair_flip`) between the crops and RandAugment. `aug`: `transforms.pretrain_transform`'s keywords."""

    def __init__(
        self,
        source: NLVRSource,
        *,
        text: NLVRText,
        image_size: int,
        aug: dict,
        seed: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        # The pre-training transform without its flip, cut after its crop: the pair's flip goes in between.
        transform, crop, after_flip = split_at_crop(image_size, aug)
        super().__init__(
            source, transform=transform, max_words=text.max_words, seed=seed, max_pixels=max_pixels
        )
        self.crop = crop
        self.after_flip = after_flip
        self.hflip = bool(aug["hflip"])
        self.text = text

    def _decode(self, index: int) -> list[Image.Image] | None:
        out = []
        for k, path in enumerate(self.source.paths(index)):
            try:
                with open(path, "rb") as f:
                    out.append(decode_rgb(f.read(), self.max_pixels))
            except (OSError, BadImage) as e:
                logger.warning("skipping pair %d: image %d (%s): %s", index, k, path, e)
                return None
        return out

    def _load(self, index: int, rng: random.Random | Any) -> dict | None:
        images = self._decode(index)
        if images is None:
            return None
        draft = self.text.draw(self.source, index, rng)
        crops = [self.crop(img) for img in images]  # draws from torch's (per-sample seeded) generator
        order, mirrors, swapped = self.text.draw_flip(rng, self.hflip)
        out = []
        for k, mirrored in zip(order, mirrors, strict=True):
            img = crops[k].transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else crops[k]
            out.append(self.after_flip(img))
        return {"images": out, "text": self.text.finish(draft, swapped), "index": index}


class NLVRCollator:
    """Samples of `NLVRTrainDataset` (None = unusable pair) -> the NLVR2 batch format; tokenises in the
    worker."""

    def __init__(self, text: NLVRText) -> None:
        self.text = text

    def __call__(self, samples: list[dict | None]) -> dict:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        if not kept:
            out = empty_batch(skipped)
            image = out.pop("image")
            return {"image0": image, "image1": image.clone(), **out, **self.text.empty()}
        return {
            "image0": torch.stack([s["images"][0] for s in kept]),  # [B, 3, S, S]
            "image1": torch.stack([s["images"][1] for s in kept]),  # [B, 3, S, S]
            **self.text.batch([s["text"] for s in kept]),
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),  # [B]
            "num_skipped": skipped,
        }


class NLVRSamples(TextSideSamples):
    """NLVR2 pairs for `loaders.build_train_loader`: `NLVRTrainDataset` + `NLVRCollator` (torch) or the DALI
    loader with `NLVRText` (two images per sample) as its text side."""

    noun = "sentences"
    dataset_cls = NLVRTrainDataset
    collator_cls = NLVRCollator
    what = "NLVR2"

    def __init__(self, *, max_words: int, flip_swap: bool) -> None:
        self.max_words = max_words
        self.flip_swap = flip_swap

    def text(self, tokenizer: TextTokenizer) -> NLVRText:
        return NLVRText(tokenizer, max_words=self.max_words, flip_swap=self.flip_swap)



def build_nlvr_train_loader(
    cfg,
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """(loader, sampler) over all of cfg.nlvr.train_file concatenated (record i of the concatenation is the
    batches' "index" i), at model.vision.image_size with the fine-tuning augmentation of cfg.data and the
    pair flip of nlvr.flip_swap, through DALI when data.loader = dali (images on `device` in `dtype`; the
    pipeline runs on the 2 B images of a batch), else PIL + torchvision in DataLoader workers; sharded over
    ranks, drop_last. Batches in the NLVR2 batch format (module docstring); sentences keep data.max_words
    words and at most data.max_tokens tokens (`tokenizer`'s cap). Call `sampler.set_epoch(epoch)` before
    each epoch."""
    files = list(cfg.nlvr.train_file)
    if not files:
        raise ValueError("nlvr.train_file is empty: give the NLVR2 training JSON file(s)")
    records = []
    for f in files:
        records += load_nlvr_records(f, image_root=cfg.nlvr.image_root)
    counts = Counter("True" if r["label"] else "False" for r in records)
    logger.info("NLVR2 train set: %d sentences (%s) from %s", len(records), dict(counts), files)
    return build_train_loader(
        NLVRSource(records),
        cfg.data,
        tokenizer,
        image_size=cfg.model.vision.image_size,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        kind=NLVRSamples(max_words=cfg.data.max_words, flip_swap=cfg.nlvr.flip_swap),
    )


# ------------------------------------------------------------------------------------------- evaluation
class NLVREvalSet:
    """An NLVR2 evaluation split (dev or test-P), in file order: sentences [N] (cleaned with
    clean_caption(s, max_words)), labels [N] (1 = True, 0 = False), images0 / images1 [N] (absolute paths of
    the left / right images), types [N] (the records' "truth_type" when every record has one, else None).
    A missing image is an error at construction."""

    def __init__(
        self,
        path: str | Path,
        *,
        image_root: str = "",
        image_size: int,
        max_words: int,
        loader: str = "torch",
    ) -> None:
        if loader not in ("torch", "dali"):
            raise ValueError(f"loader must be 'torch' or 'dali', got {loader!r}")
        records = load_nlvr_records(path, image_root=image_root)
        self.path = str(path)
        self.loader = loader
        self.image_size = image_size
        self.sentences = [clean_caption(r["sentence"], max_words) for r in records]
        self.labels = [r["label"] for r in records]
        self.images0 = [r["images"][0] for r in records]
        self.images1 = [r["images"][1] for r in records]
        types = [r["type"] for r in records]
        self.types: list[str] | None = types if all(t is not None for t in types) else None
        missing = sorted({p for p in self.images0 + self.images1 if not os.path.isfile(p)})
        if missing:
            raise FileNotFoundError(f"NLVR2 file {path}: {len(missing)} image(s) missing, e.g. {missing[:3]}")
        logger.info(
            "NLVR2 eval set %s: %d sentences (%d true) on %d images",
            path,
            len(self.sentences),
            sum(self.labels),
            len(set(self.images0 + self.images1)),
        )

    def __len__(self) -> int:
        return len(self.sentences)

    def image_batches(
        self,
        start: int,
        end: int,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The pairs of examples start..end-1 with the eval transform (bicubic resize to S x S, CLIP
        normalisation), in order: (image0 float [B, 3, S, S], image1 float [B, 3, S, S], LongTensor [B]
        example indices), through the PIL reference (DataLoader with `num_workers`, per side) or DALI
        (`num_workers` threads; the images arrive on `device`), as `loader` says."""
        sides = [
            eval_image_batches(
                paths,
                start,
                end,
                image_size=self.image_size,
                loader=self.loader,
                batch_size=batch_size,
                device=device,
                num_workers=num_workers,
            )
            for paths in (self.images0, self.images1)
        ]
        for (x0, ids), (x1, ids1) in zip(*sides, strict=True):
            if not torch.equal(ids, ids1):
                raise RuntimeError(f"NLVR2 eval images out of step: {ids.tolist()} vs {ids1.tolist()}")
            yield x0, x1, ids
