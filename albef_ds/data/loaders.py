"""The training loader builders: a `ShardedEpochSampler` over an image-text source and one of two backends,
as `data.loader` says: "torch" (an `ImageTextDataset` + `ImageTextCollator` in DataLoader workers, the
reference) or "dali" (`dali.DaliImageTextLoader`, imported only when selected). Both yield the batch format
of `batch`. What a sample holds beyond its image is a `SampleKind`: image-text pairs by default; a task with
other samples (`vqa.VQASamples`, `ve.VESamples`, `nlvr.NLVRSamples`: two images per sample) passes its own
dataset, collator and DALI text side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import ImageTextCollator, ImageTextDataset
from .sampler import ShardedEpochSampler, refill_batches
from .sources import ImageTextSource, open_source
from .text import TextTokenizer
from .transforms import pretrain_transform

logger = logging.getLogger(__name__)


class SampleKind:
    """What `build_train_loader` builds around its sampler for one kind of training sample: the torch
    backend's dataset and collator and the DALI loader's text side. This base class: image-text pairs, one
    caption each, in the batch format of `batch` (pre-training, retrieval fine-tuning)."""

    noun = "pairs"  # what the log line counts

    def dataset(
        self,
        source: ImageTextSource,
        data_cfg,
        tokenizer: TextTokenizer,
        *,
        image_size: int,
        aug: dict,
        seed: int,
        with_idx: bool,
    ) -> Dataset:
        """The torch dataset over `source`; `aug`: the augmentation keywords of `pretrain_transform`. Its
        `set_epoch(epoch)` is called before each epoch (per-sample seeds)."""
        return ImageTextDataset(
            source,
            transform=pretrain_transform(image_size, **aug),
            max_words=data_cfg.max_words,
            seed=seed,
            max_pixels=data_cfg.max_image_pixels,
            with_idx=with_idx,
        )

    def collator(self, tokenizer: TextTokenizer, *, with_idx: bool):
        """The torch backend's collate_fn: samples (None = skipped) -> a batch."""
        return ImageTextCollator(tokenizer, with_idx)

    def dali_text(self, tokenizer: TextTokenizer, data_cfg):
        """The DALI loader's text side (see `dali.CaptionText`); None = that default."""
        return None


class TextSideSamples(SampleKind):
    """A kind of sample built around one text-side object (`text(tokenizer)`, also the DALI loader's text
    side): the torch dataset is `dataset_cls(source, text=..., image_size, aug, seed, max_pixels)` and the
    collator `collator_cls(text)`. VQA, SNLI-VE and NLVR2 samples are such kinds; none carries image
    numbers."""

    dataset_cls: type
    collator_cls: type
    what = "these"  # the task named in errors

    def text(self, tokenizer: TextTokenizer):
        raise NotImplementedError

    def dataset(self, source, data_cfg, tokenizer, *, image_size, aug, seed, with_idx) -> Dataset:
        if with_idx:
            raise ValueError(f"{self.what} batches carry no image numbers (with_idx)")
        return self.dataset_cls(
            source,
            text=self.text(tokenizer),
            image_size=image_size,
            aug=aug,
            seed=seed,
            max_pixels=data_cfg.max_image_pixels,
        )

    def collator(self, tokenizer: TextTokenizer, *, with_idx: bool):
        return self.collator_cls(self.text(tokenizer))

    def dali_text(self, tokenizer: TextTokenizer, data_cfg):
        return self.text(tokenizer)


class _Stream(Sampler[int]):
    """The DataLoader's view of `ShardedEpochSampler.stream()` (endless: the loader stops reading it)."""

    def __init__(self, sampler: ShardedEpochSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[int]:
        return self.sampler.stream()


def _as_list(samples: list) -> list:
    return samples  # collation happens after refilling, in RefillLoader


class RefillLoader:
    """The torch backend's training loader: DataLoader workers read, decode and augment this rank's stream
    of samples (`sampler.stream()`) in chunks of batch_size; unusable samples (the dataset's None) are
    dropped and each batch is filled up from the next samples (`sampler.refill_batches`), so every batch
    holds exactly batch_size samples and `num_skipped` says how many unusable ones it consumed. Yields
    `sampler.batches_per_epoch` batches from the sampler's start. The collate_fn runs in this process on
    the batch_size kept samples (it cannot run in a worker: a batch's members are known only once the
    unusable samples before it are)."""

    def __init__(
        self,
        dataset: Dataset,
        sampler: ShardedEpochSampler,
        collate_fn,
        *,
        batch_size: int,
        num_workers: int,
        worker_init_fn=None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._worker_init_fn = worker_init_fn
        self._generator = generator

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch - self.sampler.start_batch

    def __iter__(self) -> Iterator[dict]:
        n = len(self)
        if n <= 0:
            return
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=_Stream(self.sampler),
            num_workers=self.num_workers,
            collate_fn=_as_list,
            pin_memory=False,
            persistent_workers=False,  # workers must be re-created per epoch to see the dataset's new epoch
            worker_init_fn=self._worker_init_fn,
            generator=self._generator,
        )
        chunks = iter(loader)
        samples = ((-1 if s is None else s["index"], s) for chunk in chunks for s in chunk)
        for kept, skipped in refill_batches(samples, self.batch_size, n, limit=self.sampler.per_rank):
            batch = self.collate_fn([s for _, s in kept])
            batch["num_skipped"] = skipped
            yield batch
        del samples, chunks  # shuts the workers down (they would go on reading the endless stream)


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
    kind: SampleKind | None = None,
):
    """A training loader over `source` and its `ShardedEpochSampler`, as `data_cfg.loader` says.

    "dali": `dali.DaliImageTextLoader` (batches on `device` in `dtype`). "torch": a DataLoader over an
    `ImageTextDataset` with `ImageTextCollator`. With `with_idx` the batches carry "idx" =
    `source.image_id` (retrieval fine-tuning). Both use the pre-training transform of `data_cfg`
    (crop_scale, hflip, RandAugment) at `image_size` and drop the last partial batch. `kind` (default:
    image-text pairs) supplies the dataset, collator and DALI text side of another kind of sample.
    """
    kind = SampleKind() if kind is None else kind
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
            text=kind.dali_text(tokenizer, data_cfg),
            **aug,
        )
    else:
        dataset = kind.dataset(
            source, data_cfg, tokenizer, image_size=image_size, aug=aug, seed=seed, with_idx=with_idx
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
        loader = RefillLoader(
            dataset,
            sampler,
            kind.collator(tokenizer, with_idx=with_idx),
            batch_size=batch_size,
            num_workers=workers,
            worker_init_fn=_WorkerSeeder() if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed + rank),  # worker base seeds, not the global RNG
        )
    logger.info(
        "training loader (%s): %d %s, rank %d/%d, %d batches of %d per epoch, %d %s",
        data_cfg.loader,
        len(source),
        kind.noun,
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
