"""Weakly-supervised grounding data (RefCOCO+): the ALBEF JSON files, our refs / proposals layout, the
training set as retrieval pairs and the evaluation set.

**ALBEF files** (as the reference ships refcoco+_train.json / refcoco+_test.json) ::

    train:      [{"image": str, "text": str}, ...]                          one entry per expression
    val / test: [{"image": str, "text": str, "ref_id": int | str}, ...]     one entry per expression

A ref with several expressions repeats its ref_id. "image" is relative to `image_root` ("" = the JSON file's
folder; an absolute path is kept). Other fields are ignored. Every format error names the file, the entry
and the field.

**refs.json** (our layout; `refer.convert_refer` writes it from the REFER API's refs(unc).p + instances.json;
`synth_grounding` writes one for the synthetic set) ::

    {"refs":   {"<ref_id>": {"image_id": int | str,
                             "split": "train" | "val" | "test" | "testA" | "testB" | "testC",
                             "box": [x, y, w, h]}, ...},
     "images": {"<image_id>": {"width": int, "height": int, "file_name": str (optional)}, ...}}

* keys are the ids written as JSON object keys (str): a record's ref_id 5 and "5" name the same ref;
* "box": the referred object's box in pixels of the original image, COCO convention: (x, y) the top-left
  corner, w and h > 0 the extent (instances.json's "bbox" of the ref's annotation);
* "split": REFER's split of the ref (RefCOCO / RefCOCO+ unc: train, val, testA, testB; RefCOCOg umd: test);
  accuracy is reported per split;
* "width" / "height": the original image's size (the Grad-CAM map is upsampled to it; checked against the
  image file); "file_name", when present, must be the basename of the image of every val/test record of
  the image's refs (catches refs and ALBEF files that do not belong together);
* other fields are ignored.

**proposals.json** (our layout: the reference's dets.json, MAttNet's Mask R-CNN detections, as it is) ::

    {"<image_id>": [[x, y, w, h, ...], ...], ...}

candidate boxes per image in the refs' pixel convention; values after the fourth (a detector's score or
class) are dropped. Every val/test image needs an entry, else the evaluation set refuses to load; an empty
list is allowed (that expression cannot be grounded, and the scorer counts it as a miss).

**Training.** The reference trains grounding as retrieval fine-tuning: one integer image number per image
file name (the path's basename), so every expression of an image is an ITC positive of every other and none
of them is an ITM negative. `write_retrieval_train` rewrites the train files in the Karpathy train layout
``{"image": absolute path, "caption": text, "image_id": basename}``, which `karpathy` reads and numbers
unchanged; `build_grounding_train_loader` does both (the retrieval loader, the retrieval batch format with
"idx"). Its transform is the fine-tuning augmentation of `data` (crop_scale, hflip, RandAugment); the
reference resizes without a crop, the nearest setting is data.crop_scale = [1, 1]. A horizontal flip leaves
"left" / "right" in the text as the reference does (RefCOCO+ has no location words; the synthetic set has
them unless synth.position_words is false).

**Evaluation** (`GroundingEvalSet`): per expression the cleaned text, ref_id, split, ground-truth box, the
image's proposals and its original size; the images (one per expression) through `EvalImages`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .annotations import read_json, read_json_list, require_fields, write_json_atomic
from .evalset import EvalImages
from .karpathy import build_retrieval_train_loader
from .text import TextTokenizer, clean_caption

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "testA", "testB", "testC")  # REFER's splits, in report order
RETRIEVAL_TRAIN_FILE = "grounding_train_retrieval.json"  # what build_grounding_train_loader writes

Box = tuple[float, float, float, float]  # [x, y, w, h] in pixels of the original image


# ------------------------------------------------------------------------------------------------ boxes
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_box(value: Any, where: str, *, extra: bool = False) -> Box:
    """`value` as a box (x, y, w, h) of floats; a ValueError starting with `where` unless it is a list of 4
    finite numbers (`extra`: 4 or more, the rest dropped) with w > 0 and h > 0."""
    n_ok = isinstance(value, (list, tuple)) and (len(value) >= 4 if extra else len(value) == 4)
    if not n_ok:
        want = "at least 4 numbers" if extra else "4 numbers"
        raise ValueError(f"{where} must be a box [x, y, w, h] of {want}, got {value!r:.80}")
    if not all(_is_number(v) for v in value[:4]):
        raise ValueError(f"{where}: box {value!r:.80} must hold finite numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in value[:4])
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: box {value!r:.80} has width {w:g} and height {h:g}; both must be > 0")
    return (x, y, w, h)


def _is_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool) and v != ""


# ------------------------------------------------------------------------------------- the ALBEF files
def _root(path: Path, image_root: str) -> str:
    return os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(path))


def _read_records(path: str | Path, image_root: str, fields: tuple[str, ...], what: str) -> list[dict]:
    p = Path(path)
    data = read_json_list(p, what=what, non_empty=True)
    root = _root(p, image_root)
    out = []
    for i, e in enumerate(data):
        where = f"{what} {p}: entry {i}"
        require_fields(e, where, fields)
        if not isinstance(e["image"], str) or not e["image"]:
            raise ValueError(f"{where}: field 'image' must be a non-empty str, got {e['image']!r:.80}")
        if not isinstance(e["text"], str):
            raise ValueError(f"{where}: field 'text' must be a str, got {type(e['text']).__name__}")
        r = {"image": os.path.join(root, e["image"]), "text": e["text"]}  # join keeps an absolute path
        if "ref_id" in fields:
            if not _is_id(e["ref_id"]):
                raise ValueError(
                    f"{where}: field 'ref_id' must be an int or a non-empty str, got {e['ref_id']!r}"
                )
            r["ref_id"] = e["ref_id"]
        out.append(r)
    return out


def load_grounding_train(path: str | Path, *, image_root: str = "") -> list[dict]:
    """Read and check an ALBEF grounding train file: one dict per entry, "image" (absolute path) and "text"
    (as given)."""
    return _read_records(path, image_root, ("image", "text"), "grounding train file")


def load_grounding_eval(path: str | Path, *, image_root: str = "") -> list[dict]:
    """Read and check an ALBEF grounding val/test file: one dict per entry, "image" (absolute path), "text"
    (as given) and "ref_id" (as given: int or str)."""
    return _read_records(path, image_root, ("image", "text", "ref_id"), "grounding val/test file")


# -------------------------------------------------------------------------------- refs and proposals
@dataclass(frozen=True)
class Ref:
    """One referred object: its image (a key of `GroundingRefs.images`), REFER split and box."""

    image_id: str
    split: str
    box: Box


@dataclass(frozen=True)
class RefImage:
    """An image of the refs: its original size in pixels and, when known, its file name."""

    width: int
    height: int
    file_name: str | None = None


@dataclass(frozen=True)
class GroundingRefs:
    """A loaded refs.json: refs by str(ref_id), images by str(image_id), and the file they came from."""

    path: str
    refs: dict[str, Ref]
    images: dict[str, RefImage]


@dataclass(frozen=True)
class GroundingProposals:
    """A loaded proposals.json: candidate boxes by str(image_id) (possibly none), and the file."""

    path: str
    boxes: dict[str, list[Box]]


def _mapping(value: Any, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object of {what}, got {type(value).__name__}")
    return value


def _positive_int(e: dict, key: str, where: str) -> int:
    v = e.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{where}: field '{key}' must be a positive int (pixels), got {v!r}")
    return v


def _load_image_entry(key: str, e: Any, path: Path) -> RefImage:
    where = f"refs file {path}: image {key!r}"
    _mapping(e, where, "width, height, optional file_name")
    name = e.get("file_name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"{where}: field 'file_name' must be a non-empty str when present, got {name!r}")
    return RefImage(_positive_int(e, "width", where), _positive_int(e, "height", where), name)


def _load_ref_entry(key: str, e: Any, path: Path, images: dict[str, RefImage]) -> Ref:
    where = f"refs file {path}: ref {key!r}"
    require_fields(e, where, ("image_id", "split", "box"), kind="a JSON object")
    if not _is_id(e["image_id"]):
        raise ValueError(
            f"{where}: field 'image_id' must be an int or a non-empty str, got {e['image_id']!r}"
        )
    image_id = str(e["image_id"])
    if image_id not in images:
        raise ValueError(f"{where}: image_id {e['image_id']!r} has no entry in the file's 'images'")
    if e["split"] not in SPLITS:
        raise ValueError(f"{where}: field 'split' must be one of {SPLITS}, got {e['split']!r}")
    return Ref(image_id, e["split"], check_box(e["box"], f"{where}: field 'box'"))


def load_refs(path: str | Path) -> GroundingRefs:
    """Read and check a refs.json (module docstring): every image with a positive int width and height, every
    ref with an image of the file, a known split and a box of 4 finite numbers with w, h > 0."""
    p = Path(path)
    data = _mapping(read_json(p, what="refs file"), f"refs file {p}", '"refs" and "images"')
    for key in ("refs", "images"):
        if key not in data:
            raise ValueError(
                f"refs file {p} has no field '{key}' (the layout: {{'refs': ..., 'images': ...}})"
            )
    images_in = _mapping(data["images"], f"refs file {p}: field 'images'", "image_id -> width, height")
    refs_in = _mapping(data["refs"], f"refs file {p}: field 'refs'", "ref_id -> image_id, split, box")
    images = {k: _load_image_entry(k, e, p) for k, e in images_in.items()}
    refs = {k: _load_ref_entry(k, e, p, images) for k, e in refs_in.items()}
    logger.info(
        "refs %s: %d refs (%s) on %d images",
        p,
        len(refs),
        dict(Counter(r.split for r in refs.values())),
        len(images),
    )
    return GroundingRefs(str(p), refs, images)


def load_proposals(path: str | Path) -> GroundingProposals:
    """Read and check a proposals.json (the reference's dets.json): image_id -> a list of boxes, each of at
    least 4 finite numbers [x, y, w, h, ...] with w, h > 0 (values after the fourth are dropped)."""
    p = Path(path)
    data = _mapping(read_json(p, what="proposals file"), f"proposals file {p}", "image_id -> boxes")
    boxes: dict[str, list[Box]] = {}
    for key, dets in data.items():
        where = f"proposals file {p}: image {key!r}"
        if not isinstance(dets, list):
            raise ValueError(
                f"{where} must map to a list of boxes (an empty list for none), got {dets!r:.80}"
            )
        boxes[key] = [check_box(d, f"{where}, box {j}", extra=True) for j, d in enumerate(dets)]
    logger.info("proposals %s: %d boxes on %d images", p, sum(len(b) for b in boxes.values()), len(boxes))
    return GroundingProposals(str(p), boxes)


# ------------------------------------------------------------------------------------------- training
def write_retrieval_train(
    train_files: list[str] | list[Path], out_file: str | Path, *, image_root: str = ""
) -> dict[str, Any]:
    """The ALBEF grounding train files, concatenated, in the Karpathy train layout of retrieval fine-tuning:
    ``{"image": absolute path, "caption": text, "image_id": the image path's basename}`` per expression (the
    reference's one image number per file name), written atomically to `out_file`. Returns {"file",
    "entries", "images"}."""
    if not train_files:
        raise ValueError("grounding.train_file is empty: give the ALBEF grounding train JSON file(s)")
    rows = []
    for f in train_files:
        for r in load_grounding_train(f, image_root=image_root):
            rows.append({"image": r["image"], "caption": r["text"], "image_id": os.path.basename(r["image"])})
    write_json_atomic(out_file, rows)
    n_images = len({r["image_id"] for r in rows})
    logger.info("grounding train set: %d expressions of %d images from %s", len(rows), n_images, train_files)
    return {"file": str(out_file), "entries": len(rows), "images": n_images}


def build_grounding_train_loader(cfg, tokenizer: TextTokenizer, *, work_dir: str | Path, **kwargs):
    """(loader, sampler) of the grounding training set: cfg.grounding.train_file rewritten by
    `write_retrieval_train` into work_dir/RETRIEVAL_TRAIN_FILE, then `karpathy.build_retrieval_train_loader`
    on it (the retrieval batch format: "idx" = the image numbers); the keywords are its own (batch_size,
    seed, rank, world_size, num_workers, device, dtype). Every rank may call it (the file is the same)."""
    out = Path(work_dir) / RETRIEVAL_TRAIN_FILE
    write_retrieval_train(list(cfg.grounding.train_file), out, image_root=cfg.grounding.image_root)
    finetune = dataclasses.replace(cfg.finetune, train_file=[str(out)], image_root="")
    return build_retrieval_train_loader(dataclasses.replace(cfg, finetune=finetune), tokenizer, **kwargs)


# ------------------------------------------------------------------------------------------ evaluation
def _check_image_sizes(paths: dict[str, tuple[int, int]], refs_path: str) -> None:
    for path, (w, h) in paths.items():
        try:
            with Image.open(path) as im:  # the header only
                size = im.size
        except OSError as e:
            raise RuntimeError(f"grounding image {path} could not be read: {e}") from e
        if size != (w, h):
            raise ValueError(
                f"grounding image {path} is {size[0]}x{size[1]} pixels but refs file {refs_path} gives "
                f"{w}x{h}: its boxes would not match the image"
            )


class GroundingEvalSet(EvalImages):
    """A grounding val/test file with its refs and proposals, in file order, one item per expression:

    texts [N] (clean_caption(text, max_words)), ref_ids [N] (as given), splits [N] (the refs' split),
    boxes [N] (ground truth (x, y, w, h)), proposals [N] (the image's candidate boxes, possibly []),
    sizes [N] ((width, height) of the original image), image_ids [N] (str), images [N] (absolute paths;
    expressions about one image repeat it). `image_batches` serves the images with the eval transform
    through `loader` ("torch" | "dali"); `split_names`: the splits present, in SPLITS order.

    Refused at construction, with the file, entry and id named: a ref_id missing from the refs, an image id
    missing from the proposals, an image whose file name differs from the refs' "file_name", a missing image
    file, and (with `check_image_sizes`) an image whose size differs from the refs'.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        refs: str | Path | GroundingRefs,
        proposals: str | Path | GroundingProposals,
        image_root: str = "",
        image_size: int,
        max_words: int,
        loader: str = "torch",
        check_image_sizes: bool = True,
    ) -> None:
        if loader not in ("torch", "dali"):
            raise ValueError(f"loader must be 'torch' or 'dali', got {loader!r}")
        refs = refs if isinstance(refs, GroundingRefs) else load_refs(refs)
        proposals = proposals if isinstance(proposals, GroundingProposals) else load_proposals(proposals)
        records = load_grounding_eval(path, image_root=image_root)
        self.path = str(path)
        self.loader = loader
        self.image_size = image_size
        self.texts = [clean_caption(r["text"], max_words) for r in records]
        self.ref_ids = [r["ref_id"] for r in records]
        self.images = [r["image"] for r in records]
        self.image_ids: list[str] = []
        self.splits: list[str] = []
        self.boxes: list[Box] = []
        self.proposals: list[list[Box]] = []
        self.sizes: list[tuple[int, int]] = []
        for i, r in enumerate(records):
            where = f"grounding val/test file {path}: entry {i}"
            ref = refs.refs.get(str(r["ref_id"]))
            if ref is None:
                raise ValueError(f"{where}: ref_id {r['ref_id']!r} has no entry in refs file {refs.path}")
            img = refs.images[ref.image_id]
            if img.file_name is not None and os.path.basename(img.file_name) != os.path.basename(r["image"]):
                raise ValueError(
                    f"{where}: field 'image' {r['image']!r} is not the image of ref {r['ref_id']!r}: refs "
                    f"file {refs.path} gives image_id {ref.image_id!r} the file name {img.file_name!r}"
                )
            if ref.image_id not in proposals.boxes:
                raise ValueError(
                    f"proposals file {proposals.path} has no entry for image_id {ref.image_id!r} (the image "
                    f"{r['image']} of ref {r['ref_id']!r}, {where}); an image without proposals needs an "
                    "empty list"
                )
            self.image_ids.append(ref.image_id)
            self.splits.append(ref.split)
            self.boxes.append(ref.box)
            self.proposals.append(proposals.boxes[ref.image_id])
            self.sizes.append((img.width, img.height))
        missing = sorted({p for p in self.images if not os.path.isfile(p)})
        if missing:
            raise FileNotFoundError(
                f"grounding val/test file {path}: {len(missing)} image(s) missing, e.g. {missing[:3]}"
            )
        if check_image_sizes:
            _check_image_sizes(dict(zip(self.images, self.sizes)), refs.path)
        logger.info(
            "grounding eval set %s: %d expressions (%s) on %d images",
            path,
            len(self.texts),
            dict(Counter(self.splits)),
            len(set(self.images)),
        )

    @property
    def split_names(self) -> tuple[str, ...]:
        present = set(self.splits)
        return tuple(s for s in SPLITS if s in present)

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> GroundingEvalSet:
        """A view of the first n expressions (the per-expression lists cut, everything else shared)."""
        view = copy.copy(self)
        for key in ("texts", "ref_ids", "images", "image_ids", "splits", "boxes", "proposals", "sizes"):
            setattr(view, key, getattr(self, key)[:n])
        return view
