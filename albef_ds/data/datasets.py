"""Image-text datasets, the batch collator, the resumable distributed sampler and the loader builders.

Batch format (the project's stable interface between data and trainer)::

    {"image": FloatTensor [B, 3, S, S], "input_ids": LongTensor [B, L], "attention_mask": LongTensor [B, L],
     "index": LongTensor [B], "num_skipped": int}

B can be smaller than the requested batch size: samples whose image is missing or undecodable are dropped by
the collator and counted in `num_skipped` (web-scale image-text sets always have some broken files).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .sources import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    ImageTextSource,
    decode_rgb,
    open_source,
)
from .text import TextTokenizer, clean_caption
from .transforms import eval_transform, pretrain_transform

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ annotations
def _check_entry(entry: Any, i: int, path: Path) -> None:
    where = f"annotation file {path}: entry {i}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with 'image' and 'caption', got {type(entry).__name__}")
    for key in ("image", "caption"):
        if key not in entry:
            raise ValueError(f"{where} has no field '{key}'")
    if not isinstance(entry["image"], str) or not entry["image"]:
        raise ValueError(f"{where}: field 'image' must be a non-empty str, got {entry['image']!r}")
    cap = entry["caption"]
    if isinstance(cap, list):
        if not cap:
            raise ValueError(f"{where}: field 'caption' is an empty list")
        bad = [j for j, c in enumerate(cap) if not isinstance(c, str)]
        if bad:
            raise ValueError(
                f"{where}: field 'caption' must be a str or a list of str; item {bad[0]} is "
                f"{type(cap[bad[0]]).__name__}"
            )
    elif not isinstance(cap, str):
        raise ValueError(f"{where}: field 'caption' must be a str or a list of str, got {type(cap).__name__}")


def load_annotations(path: str | Path, image_root: str = "") -> list[dict]:
    """Read and validate a JSON list of {"image": str, "caption": str | [str], optional "image_id"}.

    Relative image paths are resolved against `image_root` when given, else against the JSON file's folder;
    the returned entries hold absolute image paths and the captions as given (uncleaned).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file {p} does not exist")
    try:
        with p.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {p} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"annotation file {p} must hold a JSON list of entries, got {type(data).__name__}")
    root = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(p))
    out = []
    for i, entry in enumerate(data):
        _check_entry(entry, i, p)
        e = dict(entry)
        e["image"] = os.path.join(root, e["image"])  # join keeps an absolute entry path as it is
        out.append(e)
    return out


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # Mix (seed, epoch, index) so neighbouring samples get unrelated RNG streams. Shape: one 63-bit int.
    mask = (1 << 64) - 1
    state = np.random.SeedSequence([seed & mask, epoch & mask, index & mask]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


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
        s = _sample_seed(self.seed, self.epoch, index)
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
def empty_batch(skipped: int, image: torch.Tensor | None = None, with_idx: bool = False) -> dict:
    """The batch format with no sample (every image of the batch was skipped)."""
    out = {
        "image": torch.zeros((0, 3, 0, 0)) if image is None else image,
        "input_ids": torch.zeros((0, 0), dtype=torch.long),
        "attention_mask": torch.zeros((0, 0), dtype=torch.long),
        "index": torch.zeros(0, dtype=torch.long),
        "num_skipped": skipped,
    }
    if with_idx:
        out["idx"] = torch.zeros(0, dtype=torch.long)
    return out


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


# --------------------------------------------------------------------------------------------- sampler
class ShardedEpochSampler(Sampler[int]):
    """Seeded per-epoch shuffle, split into disjoint per-rank shares, resumable mid-epoch.

    Epoch e uses the permutation of `torch.Generator().manual_seed(seed + epoch)`. The global order is cut to
    a multiple of world_size * batch_size (drop_last) or of world_size, never padded with duplicates, and
    rank r takes every world_size-th index from position r. `set_start(n)` skips this rank's first n batches
    of the current epoch; a later `set_epoch` with a different epoch clears it.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batch_size: int,
        drop_last: bool = True,
        on_set_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        per_step = world_size * batch_size if drop_last else world_size
        if num_samples < per_step:
            raise ValueError(
                f"{num_samples} samples cannot fill one step of world_size ({world_size}) x batch_size "
                f"({batch_size}); use a larger data set or a smaller batch"
            )
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.total = num_samples // per_step * per_step  # samples used per epoch over all ranks
        self.per_rank = self.total // world_size
        self.epoch = 0
        self.start_batch = 0
        self._on_set_epoch = on_set_epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a full epoch (ignores set_start)."""
        return -(-self.per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch
        if self._on_set_epoch is not None:
            self._on_set_epoch(epoch)

    def set_start(self, batches_done: int) -> None:
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done must lie in [0, {self.batches_per_epoch}], got {batches_done}")
        self.start_batch = batches_done

    def _skip(self) -> int:
        return min(self.start_batch * self.batch_size, self.per_rank)

    def rank_indices(self) -> list[int]:
        """This rank's indices for the current epoch, before set_start is applied."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)[: self.total]  # [total]
        return order[self.rank :: self.world_size].tolist()  # [per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self._skip() :])

    def __len__(self) -> int:
        return self.per_rank - self._skip()


# ---------------------------------------------------------------------------------------------- loaders
class _WorkerSeeder:
    """worker_init_fn: torch already seeds `random` and torch per worker; seed numpy from the same base."""

    def __call__(self, worker_id: int) -> None:
        np.random.seed(torch.initial_seed() % 2**32)


def build_train_loader(
    source: ImageTextSource,
    data_cfg,
    tokenizer: TextTokenizer,
    *,
    image_size: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_idx: bool = False,
):
    """A training loader over `source` and its `ShardedEpochSampler`, as `data_cfg.loader` says.

    "dali": `dali.DaliImageTextLoader` (batches on `device` in `dtype`). "torch": a DataLoader over an
    `ImageTextDataset` with `ImageTextCollator`. With `with_idx` the batches carry "idx" =
    `source.image_id` (retrieval fine-tuning). Both use the pre-training transform of `data_cfg`
    (crop_scale, hflip, RandAugment) at `image_size` and drop the last partial batch.
    """
    workers = data_cfg.num_workers if num_workers is None else num_workers
    aug = {
        "crop_scale": tuple(data_cfg.crop_scale),
        "hflip": data_cfg.hflip,
        "randaug_n": data_cfg.randaug_n,
        "randaug_m": data_cfg.randaug_m,
    }
    if data_cfg.loader == "dali":
        from .dali import DaliImageTextLoader

        sampler = ShardedEpochSampler(
            len(source), rank=rank, world_size=world_size, seed=seed, batch_size=batch_size, drop_last=True
        )
        loader = DaliImageTextLoader(
            source,
            sampler,
            tokenizer,
            image_size=image_size,
            batch_size=batch_size,
            seed=seed,
            max_words=data_cfg.max_words,
            num_threads=max(1, workers),
            device=device,
            dtype=dtype,
            max_pixels=data_cfg.max_image_pixels,
            with_idx=with_idx,
            **aug,
        )
    else:
        transform = pretrain_transform(image_size, **aug)
        dataset = ImageTextDataset(
            source,
            transform=transform,
            max_words=data_cfg.max_words,
            seed=seed,
            max_pixels=data_cfg.max_image_pixels,
            with_idx=with_idx,
        )
        sampler = ShardedEpochSampler(
            len(dataset),
            rank=rank,
            world_size=world_size,
            seed=seed,
            batch_size=batch_size,
            drop_last=True,
            on_set_epoch=dataset.set_epoch,
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=ImageTextCollator(tokenizer, with_idx),
            drop_last=True,
            pin_memory=False,
            persistent_workers=False,  # workers must be re-created per epoch to see the dataset's new epoch
            worker_init_fn=_WorkerSeeder() if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed + rank),  # worker base seeds, not the global RNG
        )
    logger.info(
        "training loader (%s): %d pairs, rank %d/%d, %d batches of %d per epoch, %d %s",
        data_cfg.loader,
        len(source),
        rank,
        world_size,
        sampler.batches_per_epoch,
        batch_size,
        workers,
        "threads" if data_cfg.loader == "dali" else "workers",
    )
    return loader, sampler


def build_pretrain_loader(data_cfg, tokenizer: TextTokenizer, **kwargs):
    """The pre-training loader over `data_cfg.train_file` (JSON lists and/or webdataset shards) and its
    sampler (see `build_train_loader` for the keywords): `data_cfg.loader` = "torch" (PIL + torchvision in
    DataLoader workers, the reference) or "dali" (decode + augment on the training GPU, or on CPU threads).

    Augmentation is a function of (seed, epoch, sample index) only, so a run is reproducible whatever the
    number of workers and a mid-epoch resume (`sampler.set_start`) sees the same views. Call
    `sampler.set_epoch(epoch)` before iterating each epoch (it also tells the dataset the epoch).
    """
    if not data_cfg.train_file:
        raise ValueError("data.train_file is empty: give JSON annotation files or webdataset shards")
    source = open_source(list(data_cfg.train_file), data_cfg.image_root)
    return build_train_loader(source, data_cfg, tokenizer, **kwargs)


# ------------------------------------------------------------------------------------ retrieval eval set
class EvalImageDataset(Dataset):
    """Images of a retrieval set: yields (FloatTensor [3, S, S], image index); a broken image is an error."""

    def __init__(self, paths: list[str], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                img = decode_rgb(f.read())
        except (OSError, BadImage) as e:
            # Eval sets must be complete: a silently skipped image would shift every recall figure.
            raise RuntimeError(f"evaluation image {path} (image {i}) could not be read: {e}") from e
        return self.transform(img), i


class RetrievalEvalSet:
    """A held-out image-text set for retrieval: images, flattened cleaned captions and the index maps.

    texts: [T] cleaned captions; img2txt[i]: indices into texts of image i's captions; txt2img[t]: the image
    of caption t; images: [I] absolute paths; image_ids: [I] the entries' "image_id" (or the path).
    """

    def __init__(
        self, ann_file: str, *, image_root: str = "", image_size: int, max_words: int, loader: str = "torch"
    ) -> None:
        if loader not in ("torch", "dali"):
            raise ValueError(f"loader must be 'torch' or 'dali', got {loader!r}")
        self.loader = loader
        entries = load_annotations(ann_file, image_root)
        if not entries:
            raise ValueError(f"evaluation file {ann_file} holds no entries")
        self.ann_file = str(ann_file)
        self.image_size = image_size
        self.images: list[str] = []
        self.image_ids: list[Any] = []
        self.texts: list[str] = []
        self.img2txt: list[list[int]] = []
        self.txt2img: list[int] = []
        for i, e in enumerate(entries):
            caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
            self.images.append(e["image"])
            self.image_ids.append(e.get("image_id", e["image"]))
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(caps))))
            for c in caps:
                self.texts.append(clean_caption(c, max_words))
                self.txt2img.append(i)
        missing = [p for p in self.images if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"evaluation file {ann_file}: {len(missing)} image(s) missing, e.g. {missing[:3]}"
            )
        logger.info("retrieval set %s: %d images, %d texts", ann_file, len(self.images), len(self.texts))

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    def image_dataset(self) -> EvalImageDataset:
        return EvalImageDataset(self.images, eval_transform(self.image_size))

    def image_batches(
        self,
        start: int,
        end: int,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Images start..end-1 with the eval transform, in order: (float [B, 3, S, S], LongTensor [B] image
        indices), through the PIL reference (DataLoader with `num_workers`) or DALI (`num_workers` threads;
        the images arrive on `device`), as `loader` says."""
        if end <= start:
            return iter(())
        if self.loader == "dali":
            from .dali import DaliEvalImages

            it = DaliEvalImages(
                self.images[start:end],
                image_size=self.image_size,
                batch_size=batch_size,
                num_threads=max(1, num_workers),
                device=device,
            )
            return ((x, ids + start) for x, ids in it)
        ds = torch.utils.data.Subset(self.image_dataset(), range(start, end))
        return iter(DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers))
