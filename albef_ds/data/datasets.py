"""Image-text datasets and the batch collator: the torch reference backend (PIL + torchvision in DataLoader
workers). They produce the batch format of `batch` (see there); `loaders` builds DataLoaders from them.

Samples whose image is missing or undecodable come back as None from the dataset and are dropped by the
collator, counted in `num_skipped`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .batch import empty_batch
from .sampler import sample_seed
from .sources import DEFAULT_MAX_PIXELS, BadImage, ImageTextSource, decode_rgb, open_source
from .text import TextTokenizer, clean_caption

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- dataset
class ImageTextDataset(Dataset):
    """Pre-training pairs from JSON lists and/or webdataset shards (see `sources.open_source`), or a source.

    `__getitem__(i)` returns ``{"image": FloatTensor [3, S, S], "caption": str, "index": i}`` (one caption
    drawn at random when the entry has several; with `with_idx` also "idx": `source.image_id(i)`, the image
    number retrieval fine-tuning compares) or None when the image cannot be used (missing, unreadable,
    empty, not an image, truncated, too large: logged with its path and reason).

    With `seed` set, each sample's random draws (caption choice, crop, flip, RandAugment) come from an RNG
    seeded by (seed, epoch, index) and the caller's global RNG state is left untouched, so a sample's view
    depends neither on the number of workers nor on where a resumed epoch restarts. Call `set_epoch` (the
    sampler built by `build_pretrain_loader` does) before iterating an epoch.
    """

    def __init__(
        self,
        ann_files: list[str] | str | ImageTextSource,
        *,
        image_root: str = "",
        transform: Callable[[Image.Image], torch.Tensor],
        max_words: int,
        seed: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        with_idx: bool = False,
    ) -> None:
        if isinstance(ann_files, ImageTextSource):
            self.source = ann_files
        else:
            files = [ann_files] if isinstance(ann_files, (str, Path)) else list(ann_files)
            self.source = open_source(files, image_root)
        self.transform = transform
        self.max_words = max_words
        self.max_pixels = max_pixels
        self.with_idx = with_idx
        self.seed = seed
        self.epoch = 0
        logger.info("image-text dataset: %d pairs", len(self.source))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict | None:
        if self.seed is None:
            return self._load(index, random)
        s = sample_seed(self.seed, self.epoch, index)
        # fork_rng(devices=[]) saves and restores only the CPU generator, the one the transforms draw from.
        # Seed that generator alone: torch.manual_seed would also reseed every CUDA generator (dropout) when
        # this runs in the training process (num_workers=0).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)
            return self._load(index, random.Random(s))

    def _load(self, index: int, rng: random.Random | Any) -> dict | None:
        img = load_image(self.source, index, self.max_pixels)
        if img is None:
            return None
        caption = self.source.caption(index)
        if isinstance(caption, tuple):
            caption = rng.choice(caption)
        text = clean_caption(caption, self.max_words)
        out = {"image": self.transform(img), "caption": text, "index": index}
        if self.with_idx:
            out["idx"] = self.source.image_id(index)
        return out


def load_image(
    source: ImageTextSource, index: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image | None:
    """RGB image `index` of `source`, or None (logged with the file and the reason) when it cannot be used."""
    try:
        return decode_rgb(source.read(index), max_pixels)
    except (OSError, BadImage) as e:
        logger.warning("skipping image %s (index %d): %s", source.name(index), index, e)
        return None


# -------------------------------------------------------------------------------------------- collator
class ImageTextCollator:
    """List of samples (None = unreadable image) -> the batch format; tokenises inside the worker.
    `with_idx`: the batch also carries "idx", LongTensor [B] image numbers."""

    def __init__(self, tokenizer: TextTokenizer, with_idx: bool = False) -> None:
        self.tokenizer = tokenizer
        self.with_idx = with_idx

    def __call__(self, samples: list[dict | None]) -> dict:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        if not kept:
            return empty_batch(skipped, with_idx=self.with_idx)
        text = self.tokenizer([s["caption"] for s in kept])  # input_ids / attention_mask [B, L]
        out = {
            "image": torch.stack([s["image"] for s in kept]),  # [B, 3, S, S]
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),  # [B]
            "num_skipped": skipped,
        }
        if self.with_idx:
            out["idx"] = torch.tensor([s["idx"] for s in kept], dtype=torch.long)  # [B]
        return out
