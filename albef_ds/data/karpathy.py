"""Retrieval data in the Karpathy-split layout of the reference (COCO, Flickr30K).

    train: [{"image": "path.jpg", "caption": "one caption", "image_id": "coco_123" | 123}, ...]
           one entry per caption; entries of the same image share image_id.
    val / test: [{"image": "path.jpg", "caption": ["caption", ...]}, ...]   one entry per image.

Every format error names the file, the entry and the field. Val/test files are read by
`RetrievalEvalSet` after `check_karpathy_eval` has checked their layout. `write_synthetic_karpathy` turns
the embedded synthetic set into this layout (train from its train split, val + test from its held-out
split), so fine-tuning runs end to end on generated data.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .annotations import load_annotations, read_json_list
from .loaders import build_train_loader
from .sources import JsonListSource
from .text import TextTokenizer

logger = logging.getLogger(__name__)

MAX_IMAGE_IDS = 2**24  # ids travel through the float queue gather (exact below 2^24)


def _read_list(path: str | Path) -> list:
    return read_json_list(path, what="retrieval annotation file", non_empty=True)


def check_karpathy_train(path: str | Path) -> None:
    """Raise a ValueError naming file, entry and field unless every entry has a non-empty str `image`, a
    str `caption` and an `image_id` (str or int)."""
    for i, e in enumerate(_read_list(path)):
        where = f"Karpathy train file {path}: entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be an object with image, caption, image_id")
        for key in ("image", "caption", "image_id"):
            if key not in e:
                raise ValueError(f"{where} has no field '{key}' (train entries: image, caption, image_id)")
        if not isinstance(e["image"], str) or not e["image"]:
            raise ValueError(f"{where}: field 'image' must be a non-empty str, got {e['image']!r}")
        if not isinstance(e["caption"], str):
            raise ValueError(
                f"{where}: field 'caption' must be one str (one entry per caption), got "
                f"{type(e['caption']).__name__}"
            )
        if isinstance(e["image_id"], bool) or not isinstance(e["image_id"], (str, int)):
            raise ValueError(f"{where}: field 'image_id' must be a str or an int, got {e['image_id']!r}")


def check_karpathy_eval(path: str | Path) -> None:
    """Raise a ValueError naming file, entry and field unless every entry has a non-empty str `image` and
    a non-empty list of str `caption`."""
    for i, e in enumerate(_read_list(path)):
        where = f"Karpathy val/test file {path}: entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be an object with image, caption")
        for key in ("image", "caption"):
            if key not in e:
                raise ValueError(f"{where} has no field '{key}' (val/test entries: image, caption list)")
        if not isinstance(e["image"], str) or not e["image"]:
            raise ValueError(f"{where}: field 'image' must be a non-empty str, got {e['image']!r}")
        cap = e["caption"]
        if not isinstance(cap, list) or not cap or not all(isinstance(c, str) for c in cap):
            raise ValueError(f"{where}: field 'caption' must be a non-empty list of str, got {cap!r:.80}")


def _karpathy_train_source(files: list[str], image_root: str) -> JsonListSource:
    """Karpathy train files -> a source whose image_id(i) is the image number: image ids (any str/int)
    numbered 0..n_images-1 in order of first appearance across the files (what ITC and ITM compare)."""
    if not files:
        raise ValueError("finetune.train_file is empty: give one or more Karpathy train JSON files")
    entries, numbers, ids = [], [], {}
    for f in files:
        check_karpathy_train(f)
        for e in load_annotations(f, image_root):
            numbers.append(ids.setdefault((str(type(e["image_id"]).__name__), e["image_id"]), len(ids)))
            entries.append(e)
    if len(ids) >= MAX_IMAGE_IDS:
        raise ValueError(f"{len(ids)} distinct image ids in {files}: at most {MAX_IMAGE_IDS - 1} supported")
    logger.info("retrieval train set: %d captions of %d images from %s", len(entries), len(ids), files)
    return JsonListSource(entries, numbers)


def build_retrieval_train_loader(cfg, tokenizer: TextTokenizer, **kwargs):
    """Loader over cfg.finetune.train_file with the pre-training augmentation at model.vision.image_size
    (random resized crop with data.crop_scale, flip, RandAugment), sharded over ranks, drop_last; batches
    carry "idx" (image numbers). Through DALI when data.loader = dali, else PIL + torchvision workers; the
    keywords are `loaders.build_train_loader`'s (batch_size, seed, rank, world_size, device, dtype)."""
    source = _karpathy_train_source(list(cfg.finetune.train_file), cfg.finetune.image_root)
    return build_train_loader(
        source, cfg.data, tokenizer, image_size=cfg.model.vision.image_size, with_idx=True, **kwargs
    )


def write_synthetic_karpathy(
    synth_dir: str | Path,
    train_file: str | Path,
    val_file: str | Path,
    test_file: str | Path,
    *,
    num_val: int = 0,
) -> dict[str, Any]:
    """The synthetic set (written by `generate_synthetic`) in the Karpathy layout: train = one entry per
    caption of its train split (image_id kept); val = the first num_val held-out images (0 = half), test =
    the rest, with caption lists. Image paths are written relative to each output file's folder."""
    synth = Path(synth_dir)
    train = json.loads((synth / "train.json").read_text())
    held = json.loads((synth / "eval.json").read_text())
    nv = num_val if num_val > 0 else len(held) // 2
    if not 0 < nv < len(held):
        raise ValueError(
            f"finetune.synth_num_val = {num_val}: need 0 < val images < {len(held)} held-out images"
        )

    def rel(image: str, out: Path) -> str:
        return os.path.relpath((synth / image).resolve(), out.resolve().parent)

    outs = {}
    for name, path, rows in (
        ("train", Path(train_file), None),
        ("val", Path(val_file), held[:nv]),
        ("test", Path(test_file), held[nv:]),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        if rows is None:
            data = [
                {"image": rel(e["image"], path), "caption": c, "image_id": e["image_id"]}
                for e in train
                for c in e["caption"]
            ]
        else:
            data = [{"image": rel(e["image"], path), "caption": list(e["caption"])} for e in rows]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=0))
        tmp.replace(path)
        outs[name] = {"file": str(path), "entries": len(data)}
    return outs
