"""SNLI-VE data in the ALBEF JSON layout: records, the training loader (both backends) and the evaluation set.

Records: a JSON list of ::

    {"image": str, "sentence": str, "label": "entailment" | "neutral" | "contradiction" (or 2 | 1 | 0)}

"image" is relative to `image_root` ("" = the JSON file's folder; an absolute path is kept). The reference
stores a bare Flickr30K id there: a value without a file extension gets ".jpg" appended. Classes follow the
reference: entailment 2, neutral 1, contradiction 0 (`VE_LABELS`). An optional str field "hypothesis_type"
(the synthetic set's template kind) is kept for per-type scores. Every format error names the file, the
entry and the field.

The classification batch format (`build_ve_train_loader`, both backends): the image-text batch format of
`batch` plus the class of each sentence ::

    {"image": float [B, 3, S, S]   (the training dtype; DALI: on the training device),
     "input_ids": long [B, L], "attention_mask": long [B, L]   the cleaned sentences, tokenised,
     "label": long [B],                                        the class (VE_LABELS)
     "index": long [B],                                        record numbers (train files concatenated),
     "num_skipped": int}                                       samples dropped for an unusable image

Training transform: the fine-tuning augmentation of data (random resized crop with data.crop_scale,
horizontal flip when data.hflip, RandAugment, CLIP normalisation), drawn per sample as every loader does.
The flip leaves the sentence as it is (the reference's behaviour; the synthetic set names no side).

`SentenceLabelText` is the text side of a (sentence, class) sample for both backends; NLVR2 (`nlvr`) builds
on it.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .annotations import read_json_list
from .batch import empty_batch
from .datasets import ImageTextDataset, load_image
from .evalset import EvalImages
from .loaders import TextSideSamples, build_train_loader
from .sources import DEFAULT_MAX_PIXELS, ImageTextSource, JsonListSource
from .text import TextTokenizer, clean_caption
from .transforms import pretrain_transform

logger = logging.getLogger(__name__)

VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
VE_CLASS_NAMES = tuple(sorted(VE_LABELS, key=VE_LABELS.__getitem__))  # class id -> name


# ---------------------------------------------------------------------------------------------- records
def check_type_field(e: dict, key: str, where: str) -> str | None:
    """An optional str field (the synthetic sets' template kind): its value, None when absent."""
    if key not in e:
        return None
    if not isinstance(e[key], str):
        raise ValueError(f"{where}: optional field '{key}' must be a str, got {e[key]!r:.80}")
    return e[key]


def _ve_label(value: Any, where: str) -> int:
    if isinstance(value, str) and value in VE_LABELS:
        return VE_LABELS[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in VE_LABELS.values():
        return int(value)
    raise ValueError(
        f"{where}: field 'label' must be one of 'entailment', 'neutral', 'contradiction' (or the ints 2, 1, "
        f"0), got {value!r:.80}"
    )


def load_ve_records(path: str | Path, *, image_root: str = "") -> list[dict]:
    """Read and check a SNLI-VE JSON list. Returns one dict per record: "image" (absolute path, ".jpg"
    appended to a value without an extension), "sentence" (as given), "label" (int class of VE_LABELS),
    "type" (the optional "hypothesis_type" str, None when absent)."""
    p = Path(path)
    data = read_json_list(p, what="SNLI-VE file", non_empty=True)
    root = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(p))
    out = []
    for i, e in enumerate(data):
        where = f"SNLI-VE file {p}: entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be an object with image, sentence, label; got {type(e).__name__}")
        for key in ("image", "sentence", "label"):
            if key not in e:
                raise ValueError(f"{where} has no field '{key}' (records need image, sentence, label)")
        image = e["image"]
        if not isinstance(image, str) or not image:
            raise ValueError(
                f"{where}: field 'image' must be a non-empty str (path or Flickr30K id), got {image!r}"
            )
        if not isinstance(e["sentence"], str):
            raise ValueError(f"{where}: field 'sentence' must be a str, got {type(e['sentence']).__name__}")
        if not os.path.splitext(image)[1]:
            image += ".jpg"  # a bare Flickr30K id, as the reference stores it
        out.append(
            {
                "image": os.path.join(root, image),  # join keeps an absolute path as it is
                "sentence": e["sentence"],
                "label": _ve_label(e["label"], where),
                "type": check_type_field(e, "hypothesis_type", where),
            }
        )
    return out


# --------------------------------------------------------------------------------------------- training
class VESource(JsonListSource):
    """Training records as an image source (sampler and both backends serve them like image-text pairs):
    `caption(i)` is the raw sentence, `example(i)` the (sentence, class) of record i."""

    def __init__(self, records: list[dict]) -> None:
        # JsonListSource stores its entries packed (cheap to share with forked workers); the class travels in
        # the caption tuple after the sentence.
        super().__init__([{"image": r["image"], "caption": [r["sentence"], r["label"]]} for r in records])

    def example(self, i: int) -> tuple[str, int]:
        sentence, label = super().caption(i)
        return sentence, int(label)

    def caption(self, i: int) -> str:
        return super().caption(i)[0]


class SentenceLabelText:
    """The text side of a (sentence, class) sample, for both backends: the DALI loader's hook object (the
    protocol of `dali.CaptionText`) and what the torch datasets and collators call.

    `draw` reads the record's (sentence, class) (nothing random); `finish` cleans the sentence
    (`text.clean_caption`, at most `max_words` words) and ignores the flip; `batch` turns finished texts into
    "input_ids" / "attention_mask" long [B, L] and "label" long [B].
    """

    def __init__(self, tokenizer: TextTokenizer, *, max_words: int) -> None:
        self.tokenizer = tokenizer
        self.max_words = max_words

    def draw(self, source: ImageTextSource, i: int, rng: Any) -> tuple[str, int]:
        return source.example(i)

    def finish(self, example: tuple[str, int], flipped: Any) -> tuple[str, int]:
        sentence, label = example
        return clean_caption(sentence, self.max_words), label

    def batch(self, texts: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        out = self.tokenizer([t[0] for t in texts])  # input_ids / attention_mask [B, L]
        out["label"] = torch.tensor([t[1] for t in texts], dtype=torch.long)  # [B]
        return out

    # -- the rest of the DALI hook protocol --
    def encode(self, texts: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        return self.batch(texts)

    def tensors(self, encoded: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        sel = torch.tensor(rows, dtype=torch.long)
        return {k: v[sel] for k, v in encoded.items()}

    def empty(self) -> dict[str, torch.Tensor]:
        """The label of a batch with no sample (`batch.empty_batch` holds the other keys)."""
        return {"label": torch.zeros(0, dtype=torch.long)}


class VETrainDataset(ImageTextDataset):
    """The torch backend: `__getitem__(i)` -> ``{"image": FloatTensor [3, S, S], "text": (cleaned sentence,
    class), "index": i}``, or None when the image cannot be used; seeded per sample as `ImageTextDataset`.
    `aug`: `transforms.pretrain_transform`'s keywords."""

    def __init__(
        self,
        source: VESource,
        *,
        text: SentenceLabelText,
        image_size: int,
        aug: dict,
        seed: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(
            source,
            transform=pretrain_transform(image_size, **aug),
            max_words=text.max_words,
            seed=seed,
            max_pixels=max_pixels,
        )
        self.text = text

    def _load(self, index: int, rng: random.Random | Any) -> dict | None:
        img = load_image(self.source, index, self.max_pixels)
        if img is None:
            return None
        draft = self.text.draw(self.source, index, rng)
        return {"image": self.transform(img), "text": self.text.finish(draft, False), "index": index}


class SentenceLabelCollator:
    """Samples of `VETrainDataset` (None = unusable image) -> the classification batch format (module
    docstring); tokenises in the worker."""

    def __init__(self, text: SentenceLabelText) -> None:
        self.text = text

    def __call__(self, samples: list[dict | None]) -> dict:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        if not kept:
            return {**empty_batch(skipped), **self.text.empty()}
        return {
            "image": torch.stack([s["image"] for s in kept]),  # [B, 3, S, S]
            **self.text.batch([s["text"] for s in kept]),
            "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),  # [B]
            "num_skipped": skipped,
        }


class VESamples(TextSideSamples):
    """SNLI-VE (image, sentence, class) samples for `loaders.build_train_loader`: `VETrainDataset` +
    `SentenceLabelCollator` (torch) or the DALI loader with `SentenceLabelText` as its text side; sentences
    keep at most `max_words` words."""

    noun = "sentences"
    dataset_cls = VETrainDataset
    collator_cls = SentenceLabelCollator
    what = "SNLI-VE"

    def __init__(self, max_words: int) -> None:
        self.max_words = max_words

    def text(self, tokenizer: TextTokenizer) -> SentenceLabelText:
        return SentenceLabelText(tokenizer, max_words=self.max_words)



def build_ve_train_loader(
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
    """(loader, sampler) over all of cfg.ve.train_file concatenated (record i of the concatenation is the
    batches' "index" i), at model.vision.image_size with the fine-tuning augmentation of cfg.data, through
    DALI when data.loader = dali (images on `device` in `dtype`), else PIL + torchvision in DataLoader
    workers; sharded over ranks, drop_last. Batches in the classification batch format (module docstring);
    sentences keep data.max_words words and at most data.max_tokens tokens (`tokenizer`'s cap). Call
    `sampler.set_epoch(epoch)` before each epoch."""
    files = list(cfg.ve.train_file)
    if not files:
        raise ValueError("ve.train_file is empty: give the SNLI-VE training JSON file(s)")
    records = []
    for f in files:
        records += load_ve_records(f, image_root=cfg.ve.image_root)
    counts = Counter(VE_CLASS_NAMES[r["label"]] for r in records)
    logger.info("SNLI-VE train set: %d sentences (%s) from %s", len(records), dict(counts), files)
    return build_train_loader(
        VESource(records),
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
        kind=VESamples(cfg.data.max_words),
    )


# ------------------------------------------------------------------------------------------- evaluation
class VEEvalSet(EvalImages):
    """A SNLI-VE evaluation split, in file order: sentences [N] (cleaned with clean_caption(s, max_words)),
    labels [N] (int classes of VE_LABELS), images [N] (absolute paths; sentences about one image repeat it),
    types [N] (the records' "hypothesis_type" when every record has one, else None). `image_batches` serves
    the images with the eval transform through `loader` ("torch" | "dali"). A missing image is an error at
    construction."""

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
        records = load_ve_records(path, image_root=image_root)
        self.path = str(path)
        self.loader = loader
        self.image_size = image_size
        self.sentences = [clean_caption(r["sentence"], max_words) for r in records]
        self.labels = [r["label"] for r in records]
        self.images = [r["image"] for r in records]
        types = [r["type"] for r in records]
        self.types: list[str] | None = types if all(t is not None for t in types) else None
        missing = sorted({p for p in self.images if not os.path.isfile(p)})
        if missing:
            raise FileNotFoundError(
                f"SNLI-VE file {path}: {len(missing)} image(s) missing, e.g. {missing[:3]}"
            )
        logger.info(
            "SNLI-VE eval set %s: %d sentences on %d images (%s)",
            path,
            len(self.sentences),
            len(set(self.images)),
            dict(Counter(VE_CLASS_NAMES[y] for y in self.labels)),
        )

    def __len__(self) -> int:
        return len(self.sentences)
