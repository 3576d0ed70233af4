"""The training loader builders: a `ShardedEpochSampler` over an image-text source and one of two backends,
as `data.loader` says: "torch" (an `ImageTextDataset` + `ImageTextCollator` in DataLoader workers, the
reference) or "dali" (`dali.DaliImageTextLoader`, imported only when selected). Both yield the batch format
of `batch`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader

from .datasets import ImageTextCollator, ImageTextDataset
from .sampler import ShardedEpochSampler
from .sources import ImageTextSource, open_source
from .text import TextTokenizer
from .transforms import pretrain_transform

logger = logging.getLogger(__name__)


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
