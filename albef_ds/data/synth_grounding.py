"""A generated grounding set: referring expressions that single out one object of a scene of two or three,
with the ground-truth boxes and box proposals, in the ALBEF / `grounding` layouts.

**Scenes.** `synth_vqa`'s scenes (`sample_scene` / `render_scene`: objects in distinct horizontal thirds,
small or large, on a textured muted background) with two or three objects, where an object may repeat an
earlier object's shape and, independently, its colour (`_REPEAT`), so that some objects need two or more
attributes, or their third, to be told apart: "the red circle" beside a red square and a blue circle.

**Expressions** name a subset of the referent's attributes (size, colour, shape, and its third as "on the
left" / "in the middle" / "on the right") that no other object of the scene has all of, so the referent is
unique by construction ::

    the small red circle on the left     the blue square     the shape on the right     the large triangle
    the red one                          the small one       purple cross in the middle

Most name a smallest distinguishing subset; the rest any distinguishing one (over-specified, as people
often are). Without synth.position_words the third is never named (RefCOCO+'s rule; the set then survives a
horizontal flip) and objects that only their third distinguishes are not referred to; without
synth.shape_words the shape is never named either (with both off: colour and size only, what the debug ViT
sees; configs/grounding_debug.yaml). Words: only ones of
`WORDS`, all within the debug vocabulary (the WordPiece vocab of `synth`'s captions lacks j, x, z, digits
and a non-initial b: hence "shape" / "one", never "object").

**Splits** (the reported accuracy is per split, as RefCOCO+'s val / testA / testB):

=====  ==============================  ============================================
split  images                          file
=====  ==============================  ============================================
train  num_train_images, 2-3 objects   train.json  [{"image", "text", ...}]
val    num_val_images, 2-3 objects     val.json    [{"image", "text", "ref_id", ...}]
testA  the first half of num_test,     test.json   (testA records, then testB)
       three objects each
testB  the rest, two objects each      test.json
=====  ==============================  ============================================

Each image refers to min(refs_per_image, its referable objects) distinct objects, each with
expressions_per_ref expressions (distinct where the scene allows). Ids are ints, stable per split whatever
the other splits' counts: image_id = 10**6 * (split index + 1) + image number, ref_id = 10 * image_id + the
ref's number in its image.

**refs.json / proposals.json** (`grounding`'s layouts): every ref of every split with its box [x, y, w, h]
(pixels, COCO convention: the extent `synth.draw_shape` fills), every image with its size and file name;
per image num_proposals boxes in a random order: every object's box exactly, then jittered copies of them
(half of the rest, round robin) and random boxes (the others), all inside the image.

Record fields beyond the ALBEF layout, ignored by the loaders: ``attributes`` (the named subset of
ATTRIBUTES), ``target`` (the referent's index in ``objects``) and ``objects`` ([{"shape", "colour", "size",
"slot", "box": [x, y, w, h]}] left to right); train records carry ``ref_id`` too.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import GroundingSynthConfig
from .synth import COLOURS, SHAPES, SIZES, staged_folder
from .synth import GENERATOR_VERSION as SYNTH_GENERATOR_VERSION
from .synth_vqa import GENERATOR_VERSION as SYNTH_VQA_GENERATOR_VERSION
from .synth_vqa import render_scene, sample_scene

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the images, expressions, boxes or proposals change

SPLITS = ("train", "val", "testA", "testB")
SPLIT_FILES = {"train": "train.json", "val": "val.json", "testA": "test.json", "testB": "test.json"}
ATTRIBUTES = ("size", "colour", "shape", "slot")
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}  # a third, in words
NOUNS = ("shape", "one")  # the head noun of an expression that does not name the shape
WORDS = frozenset({"the", *NOUNS, *SIZES, *COLOURS, *SHAPES, *(w for p in WHERE.values() for w in p.split())})
MAX_IMAGES = 10**6  # per split: image ids are 10**6 * (split index + 1) + image number

_OBJECT_COUNTS = {"train": (2, 3), "val": (2, 3), "testA": (3,), "testB": (2,)}
_REPEAT = 0.35  # chance that an object takes an earlier object's shape (and, independently, its colour)
_MINIMAL = 0.6  # chance that an expression names a smallest distinguishing subset of attributes
_ARTICLE = 0.85  # chance of a leading "the" (always with the noun "one")
_STREAM = 17  # seed-stream key (synth: [seed, split], synth_vqa: [seed, 7, split], synth_pairs: 11, 13)
_SUBSETS = [s for k in range(1, 5) for s in itertools.combinations(ATTRIBUTES, k)]  # 15, smallest first
_OUR_FILES = {"images", "train.json", "val.json", "test.json", "refs.json", "proposals.json", "DONE"}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------------------------- scenes
def sample_grounding_scene(rng: np.random.Generator, counts: tuple[int, ...]) -> dict:
    """A `synth_vqa.sample_scene` scene with len(objects) in `counts`, where later objects may take an
    earlier object's shape or colour (a repeated colour keeps the background's contrast)."""
    while True:
        scene = sample_scene(rng)
        if len(scene["objects"]) in counts:
            break
    objs = scene["objects"]
    for k in range(1, len(objs)):
        if rng.random() < _REPEAT:
            objs[k]["shape"] = objs[int(rng.integers(k))]["shape"]
        if rng.random() < _REPEAT:
            objs[k]["colour"] = objs[int(rng.integers(k))]["colour"]
    return scene


def distinguishing_subsets(
    objects: list[dict], target: int, *, position_words: bool, shape_words: bool = True
) -> list[tuple[str, ...]]:
    """The subsets of ATTRIBUTES (smallest first) whose values only objects[target] has; "slot" only with
    `position_words`, "shape" only with `shape_words`."""
    t = objects[target]
    out = []
    for subset in _SUBSETS:
        if ("slot" in subset and not position_words) or ("shape" in subset and not shape_words):
            continue
        if sum(all(o[a] == t[a] for a in subset) for o in objects) == 1:
            out.append(subset)
    return out


def describe(obj: dict, attributes: tuple[str, ...], rng: np.random.Generator) -> str:
    """A referring expression naming `attributes` of `obj`: [the] [size] [colour] shape|noun [where]."""
    noun = obj["shape"] if "shape" in attributes else _pick(rng, NOUNS)
    words = ["the"] if noun == "one" or rng.random() < _ARTICLE else []
    words += [obj[a] for a in ("size", "colour") if a in attributes]
    words.append(noun)
    if "slot" in attributes:
        words.append(WHERE[obj["slot"]])
    return " ".join(words)


def _expressions(obj: dict, options: list[tuple[str, ...]], n: int, rng: np.random.Generator) -> list:
    """n (text, attributes) for one referent, distinct texts where a few draws find them."""
    smallest = [s for s in options if len(s) == len(options[0])]
    out: list[tuple[str, tuple[str, ...]]] = []
    for _ in range(n):
        for _ in range(10):
            subset = _pick(rng, smallest if rng.random() < _MINIMAL else options)
            text = describe(obj, subset, rng)
            if text not in {t for t, _ in out}:
                break
        out.append((text, subset))
    return out


# ---------------------------------------------------------------------------------------- proposals
def _clip_box(x0: float, y0: float, x1: float, y1: float, size: int) -> list[float]:
    """[x, y, w, h] of the corners clipped to the image, at least 2 px wide and high, rounded."""
    x0, y0 = min(max(x0, 0.0), size - 2.0), min(max(y0, 0.0), size - 2.0)
    x1, y1 = max(min(x1, float(size)), x0 + 2.0), max(min(y1, float(size)), y0 + 2.0)
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _jittered(box: list[float], size: int, rng: np.random.Generator) -> list[float]:
    x, y, w, h = box
    cx = x + w / 2 + w * float(rng.uniform(-0.25, 0.25))
    cy = y + h / 2 + h * float(rng.uniform(-0.25, 0.25))
    w, h = w * float(rng.uniform(0.7, 1.3)), h * float(rng.uniform(0.7, 1.3))
    return _clip_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, size)


def _random_box(size: int, rng: np.random.Generator) -> list[float]:
    w, h = (size * float(rng.uniform(0.1, 0.6)) for _ in range(2))
    x, y = float(rng.uniform(0, size - w)), float(rng.uniform(0, size - h))
    return _clip_box(x, y, x + w, y + h, size)


def _proposals(boxes: list[list[float]], count: int, size: int, rng: np.random.Generator) -> list:
    out = [list(b) for b in boxes]
    extra = max(0, count - len(out))
    n_jitter = (extra + 1) // 2
    out += [_jittered(boxes[k % len(boxes)], size, rng) for k in range(n_jitter)]
    out += [_random_box(size, rng) for _ in range(extra - n_jitter)]
    return [out[int(k)] for k in rng.permutation(len(out))]


# ------------------------------------------------------------------------------------------- images
def _image(split: str, i: int, cfg: GroundingSynthConfig, folder: Path, rng: np.random.Generator):
    """One image of `split`: (records, refs, image entry, proposals)."""
    k = SPLITS.index(split)
    image_id = MAX_IMAGES * (k + 1) + i
    while True:  # a scene with at least one referable object (always, with position words)
        scene = sample_grounding_scene(rng, _OBJECT_COUNTS[split])
        objects = scene["objects"]
        options = {
            t: distinguishing_subsets(
                objects, t, position_words=cfg.position_words, shape_words=cfg.shape_words
            )
            for t in range(len(objects))
        }
        referable = [t for t, o in options.items() if o]
        if referable:
            break
    name = f"images/{split}_{i:06d}.jpg"
    render_scene(scene, cfg.image_size, rng).save(folder / name, format="JPEG", quality=90)
    for o in objects:  # render_scene's [x0, y0, x1, y1] -> COCO's [x, y, w, h]
        x0, y0, x1, y1 = o.pop("box")
        o["box"] = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
    objs = [{a: o[a] for a in (*ATTRIBUTES, "box")} for o in objects]
    targets = [referable[int(j)] for j in rng.permutation(len(referable))[: cfg.refs_per_image]]
    records, refs = [], {}
    for r, t in enumerate(sorted(targets)):
        ref_id = 10 * image_id + r
        refs[str(ref_id)] = {"image_id": image_id, "split": split, "box": objs[t]["box"]}
        for text, subset in _expressions(objs[t], options[t], cfg.expressions_per_ref, rng):
            records.append(
                {
                    "image": name,
                    "text": text,
                    "ref_id": ref_id,
                    "attributes": list(subset),
                    "target": t,
                    "objects": objs,
                }
            )
    image = {"width": cfg.image_size, "height": cfg.image_size, "file_name": name}
    proposals = _proposals([o["box"] for o in objs], cfg.num_proposals, cfg.image_size, rng)
    return records, refs, (str(image_id), image), proposals


# --------------------------------------------------------------------------------------------- sets
def _signature(cfg: GroundingSynthConfig) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}  # a moved set stays valid
    return {
        "generator_version": GENERATOR_VERSION,
        "synth_generator_version": SYNTH_GENERATOR_VERSION,  # the drawing code it shares
        "synth_vqa_generator_version": SYNTH_VQA_GENERATOR_VERSION,  # the scenes it shares
        "synth_grounding": fields,
    }


def synthetic_grounding_ready(cfg: GroundingSynthConfig) -> bool:
    """True when cfg.out_dir holds a complete synthetic grounding set generated with these settings."""
    try:
        return json.loads((Path(cfg.out_dir) / "DONE").read_text()) == _signature(cfg)
    except (OSError, ValueError):
        return False


def _split_counts(cfg: GroundingSynthConfig) -> dict[str, int]:
    n_a = (cfg.num_test_images + 1) // 2
    return {
        "train": cfg.num_train_images,
        "val": cfg.num_val_images,
        "testA": n_a,
        "testB": cfg.num_test_images - n_a,
    }


def _check(cfg: GroundingSynthConfig) -> None:
    counts = (cfg.num_train_images, cfg.num_val_images, cfg.num_test_images)
    if cfg.num_train_images < 1 or min(counts) < 0 or max(counts) >= MAX_IMAGES:
        raise ValueError(
            f"synthetic grounding needs 1 <= num_train_images and 0 <= num_val_images, num_test_images, all "
            f"< {MAX_IMAGES}; got {counts[0]}, {counts[1]}, {counts[2]}"
        )
    if not 1 <= cfg.refs_per_image <= 3 or cfg.expressions_per_ref < 1:
        raise ValueError(
            "synthetic grounding needs refs_per_image in 1..3 (scenes hold at most three objects) and "
            f"expressions_per_ref >= 1; got {cfg.refs_per_image}, {cfg.expressions_per_ref}"
        )
    if cfg.num_proposals < 3:
        raise ValueError(
            f"synthetic grounding needs num_proposals >= 3 (every object's box), got {cfg.num_proposals}"
        )
    if cfg.image_size < 32:
        raise ValueError(
            f"synthetic grounding needs image_size >= 32 (three objects side by side), got {cfg.image_size}"
        )


def generate_synthetic_grounding(
    cfg: GroundingSynthConfig, *, progress: bool = True, force: bool = False
) -> Path:
    """Write the synthetic grounding set into cfg.out_dir and return that path; reuses a complete matching
    set.

    Layout: images/{split}_NNNNNN.jpg, train.json, val.json, test.json (testA then testB records), refs.json,
    proposals.json (module docstring) and, last, DONE (the settings). Every split draws from its own seed
    stream, so one split's count never changes another's images. Written to a sibling temporary folder and
    renamed into place, so a half-written set never looks complete; a folder holding anything but these
    files is refused, never overwritten.
    """
    out = Path(cfg.out_dir)
    if not force and synthetic_grounding_ready(cfg):
        logger.info("synthetic grounding set in %s is up to date", out)
        return out
    _check(cfg)
    counts = _split_counts(cfg)
    ready = lambda: synthetic_grounding_ready(cfg)  # noqa: E731
    with staged_folder(out, _OUR_FILES, ready, "synthetic grounding set") as tmp:
        files: dict[str, list[dict]] = {f: [] for f in SPLIT_FILES.values()}
        refs: dict[str, dict] = {}
        images: dict[str, dict] = {}
        proposals: dict[str, list] = {}
        bar = tqdm(total=sum(counts.values()), desc="synthetic grounding images", disable=not progress)
        with bar:
            for k, split in enumerate(SPLITS):
                # Independent seed streams: one split's draws never shift another's when counts change.
                rng = np.random.default_rng([cfg.seed, _STREAM, k])
                for i in range(counts[split]):
                    records, image_refs, (image_id, image), boxes = _image(split, i, cfg, tmp, rng)
                    files[SPLIT_FILES[split]] += records
                    refs.update(image_refs)
                    images[image_id] = image
                    proposals[image_id] = boxes
                    bar.update(1)
        for name, records in files.items():
            (tmp / name).write_text(json.dumps(records, indent=0))
        (tmp / "refs.json").write_text(json.dumps({"refs": refs, "images": images}, indent=0))
        (tmp / "proposals.json").write_text(json.dumps(proposals, indent=0))
        (tmp / "DONE").write_text(json.dumps(_signature(cfg)))
    logger.info(
        "synthetic grounding set: %s images of %d px, %d refs, in %s",
        "/".join(str(counts[s]) for s in SPLITS),
        cfg.image_size,
        len(refs),
        out,
    )
    return out
