"""Held-out retrieval sets: the images, the flattened cleaned captions and the image <-> text index maps,
with the images served in order through the PIL reference (`EvalImageDataset`) or DALI (imported only when
selected): `eval_image_batches`, shared with the other tasks' eval sets (`vqa.VQAEvalSet`). Eval sets must be
complete: an unreadable or missing image is an error, never skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .annotations import load_annotations
from .sources import BadImage, decode_rgb
from .text import clean_caption
from .transforms import eval_transform

logger = logging.getLogger(__name__)


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


def eval_image_batches(
    paths: list[str],
    start: int,
    end: int,
    *,
    image_size: int,
    loader: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Images paths[start:end] with the eval transform, in order: (float [B, 3, S, S], LongTensor [B] indices
    into `paths`), through the PIL reference (DataLoader with `num_workers`) or DALI (`num_workers` threads;
    the images arrive on `device`), as `loader` ("torch" | "dali") says."""
    if end <= start:
        return iter(())
    if loader == "dali":
        from .dali import DaliEvalImages

        it = DaliEvalImages(
            paths[start:end],
            image_size=image_size,
            batch_size=batch_size,
            num_threads=max(1, num_workers),
            device=device,
        )
        return ((x, ids + start) for x, ids in it)
    ds = torch.utils.data.Subset(EvalImageDataset(paths, eval_transform(image_size)), range(start, end))
    return iter(DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers))


class EvalImages:
    """`image_batches` for an evaluation set with `images` (paths), `image_size` and `loader` attributes."""

    images: list[str]
    image_size: int
    loader: str

    def image_batches(
        self,
        start: int,
        end: int,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Images start..end-1 with the eval transform (bicubic resize to S x S, CLIP normalisation), in
        order: (float [B, 3, S, S], LongTensor [B] indices into `images`), through the PIL reference
        (DataLoader with `num_workers`) or DALI (`num_workers` threads; the images arrive on `device`), as
        `loader` says."""
        return eval_image_batches(
            self.images,
            start,
            end,
            image_size=self.image_size,
            loader=self.loader,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
        )


class RetrievalEvalSet(EvalImages):
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
