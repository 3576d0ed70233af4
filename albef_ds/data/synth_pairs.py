"""Generated NLVR2 and SNLI-VE sets: statements about images of one to three objects, in the tasks' layouts;
and captions of the same scenes for NLVR2's text-assignment pre-training.

The images are `synth_vqa`'s scenes (`synth_vqa.sample_scene` / `render_scene`): 1-3 objects of distinct
shapes and distinct colours, each in its own horizontal slot (left / middle / right), small or large, on a
textured muted background, so every statement below is true or false (or, for SNLI-VE's neutral class,
undecidable) by construction.

**NLVR2** (`generate_synthetic_nlvr2`): a pair of images and a statement about the pair, label "True" /
"False", balanced (true and false alternate; each template kind is drawn as often true as false):

==========  ====================================================  ======================================
truth_type  example (true)                                        false version (a minimal edit)
==========  ====================================================  ======================================
contains    the left image contains a red circle                  another colour, or the other image
count       there are two shapes in the right image               another count
more        the right image has more shapes than the left image   the two images swapped
both        both images contain a triangle / a red shape          one only the one image has
size        the circle in the left image is large                 the other size
position    in the left image the circle is on the left           another slot of that image
==========  ====================================================  ======================================

Left/right words name an image of the pair or a slot inside one image, so mirroring the whole pair (the
images swapped, each mirrored, "left" <-> "right" in the text: `nlvr.pair_flip`) keeps every label true.

**SNLI-VE** (`generate_synthetic_ve`): one image and a hypothesis, labels "entailment" / "neutral" /
"contradiction", balanced (shuffled blocks of the three):

* entailment: a true statement of one kind (hypothesis_type): exists ("there is a red circle"), colour
  ("the square is blue"), size ("the circle is small"), count ("there are two shapes"), position ("the
  circle is in the middle", "the square is between the circle and the cross");
* contradiction: a false statement of the same kinds (a wrong colour, size, count or position of a present
  object, or an absent object stated as present); hypothesis_type as for entailment;
* neutral (hypothesis_type "neutral"): a present object with one of NEUTRAL_PREDICATES ("the red circle is
  new", "the square was drawn first", ...), predicates that no entailment or contradiction uses.

SNLI-VE positions are only "in the middle" and "between", which a horizontal flip keeps true: the VE
loader flips images without touching the text, as the reference does.

**Naming objects** (`synth.refer_by`): "shape" (the default, as above) or "colour": every statement then names
objects by colour only ("the left image contains a red shape", "the blue shape is small", "the shape in the
middle is green"), which the from-scratch debug ViT can check (it sees colour but not shape:
benchmarks/README.md, "What the debug model can learn"). Colours are unique within a scene, so the reference
stays unambiguous; the kinds and their balance are the same.

**Text assignment** (`generate_synthetic_ta`): the scenes in the pre-training layout, captions naming every
object by colour, some with its size ("there are two shapes, a red shape and a small blue shape").

Words: all within the debug vocabulary's alphabet (the WordPiece vocab of `synth`'s captions lacks j, x, z,
digits and a non-initial b), counts written as words; most are words of `synth`'s captions ("there is",
"image", the shapes, colours and sizes).

Record fields beyond the task's layout, ignored by the loaders except the type (kept for per-type scores):
``truth_type`` / ``hypothesis_type`` and ``objects`` ([{"shape", "colour", "size", "box": [x0, y0, x1,
y1]}] left to right, box in pixels; NLVR2: one such list per image).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import PairSynthConfig
from .synth import COLOURS, SHAPES, SIZES, staged_folder
from .synth import GENERATOR_VERSION as SYNTH_GENERATOR_VERSION
from .synth_vqa import COUNT_WORDS, SLOTS, render_scene, sample_scene
from .synth_vqa import GENERATOR_VERSION as SYNTH_VQA_GENERATOR_VERSION

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the images or statements change, so stale sets are regenerated

SPLITS = ("train", "val", "test")
SIDES = ("left", "right")  # the two images of an NLVR2 pair
NLVR_TYPES = ("contains", "count", "more", "both", "size", "position")
VE_TYPES = ("exists", "colour", "size", "count", "position")  # entailment and contradiction kinds
VE_LABEL_NAMES = ("entailment", "neutral", "contradiction")
# How statements name a present object: "shape" ("the circle", the default) or "colour" ("the red shape"):
# the from-scratch debug ViT sees colour but not shape (benchmarks/README.md, "What the debug model can
# learn"), so the debug recipes name objects by colour and every statement is one it can check.
REFER_BY = ("shape", "colour")
NEUTRAL_PREDICATES = ("is new", "is very old", "is heavy", "was drawn first", "is made of paper")
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}  # a slot, in words
_STREAMS = {"nlvr2": 11, "ve": 13, "ta": 17}  # seed-stream keys (synth: [seed, split], synth_vqa: [seed, 7, split])
_MAX_TRIES = 1000  # scene draws per example before giving up (a feasible scene comes within a few)

_NLVR_TEMPLATES: dict[str, tuple[str, ...]] = {
    "contains": (
        "the {side} image contains {a} {colour} {shape}",
        "there is {a} {colour} {shape} in the {side} image",
        "the {side} image shows {a} {colour} {shape}",
    ),
    "count": ("there {are} {count} {shapes} in the {side} image", "the {side} image shows {count} {shapes}"),
    "more": (
        "the {more} image has more shapes than the {fewer} image",
        "the {more} image has more shapes",
        "the {fewer} image has fewer shapes",
    ),
    "both": ("both images contain {a} {thing}", "there is {a} {thing} in both images"),
    "size": ("the {shape} in the {side} image is {size}", "in the {side} image the {shape} is {size}"),
    "position": ("in the {side} image the {shape} is {where}", "the {shape} in the {side} image is {where}"),
}
_VE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "exists": (
        "there is {a} {colour} {shape}",
        "there is {a} {colour} {shape} in the image",
        "the image shows {a} {colour} {shape}",
    ),
    "colour": ("the {shape} is {colour}", "the {shape} in the image is {colour}"),
    "exists_colour": ("there is {a} {colour} shape", "the image shows {a} {colour} shape"),
    "colour_middle": ("the shape in the middle is {colour}", "the middle shape is {colour}"),
    "size": ("the {shape} is {size}", "the {colour} {shape} is {size}"),
    "count": ("there {are} {count} {shapes}", "the image shows {count} {shapes}"),
    "middle": ("the {shape} is in the middle", "the {shape} is in the middle of the image"),
    "between": ("the {shape} is between the {one} and the {other}",),
    "neutral": ("the {shape} {predicate}", "the {colour} {shape} {predicate}"),
}
_TA_TEMPLATES = (
    "{listed}",
    "the image shows {listed}",
    "there {are} {count} {shapes}, {listed}",
    "{listed} on {a_bg} {bg} background",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _other(rng: np.random.Generator, options, value):
    return _pick(rng, [o for o in options if o != value])


def _say(rng: np.random.Generator, templates: tuple[str, ...], **fields: str) -> str:
    """A random template of `templates` filled in, capitalised, with a full stop (the loaders clean it)."""
    text = _pick(rng, templates).format(**fields)
    return text[0].upper() + text[1:] + "."


def _count_fields(n: int) -> dict[str, str]:
    return {
        "count": COUNT_WORDS[n - 1],
        "are": "is" if n == 1 else "are",
        "shapes": "shape" if n == 1 else "shapes",
    }


# ---------------------------------------------------------------------------------------------- NLVR2
def _noun(obj: dict, refer_by: str) -> str:
    """How a statement names a present object: by its shape ("circle") or by its colour ("red shape");
    either is unique within a scene."""
    return obj["shape"] if refer_by == "shape" else f"{obj['colour']} shape"


def _nlvr_statement(
    kind: str, scenes: list[dict], want: bool, rng: np.random.Generator, refer_by: str = "shape"
) -> str | None:
    """A statement of `kind` about the pair (left, right scenes), true iff `want`; None when these scenes
    cannot carry it (the caller draws others). Objects are named by `refer_by` (REFER_BY)."""
    objs = [s["objects"] for s in scenes]
    t = _NLVR_TEMPLATES[kind]
    s = int(rng.integers(2))  # the image most kinds talk about
    obj = _pick(rng, objs[s])
    if kind == "contains" and refer_by == "colour":  # "a red shape": false = a colour that image lacks
        colour, side = obj["colour"], s
        if not want:
            if rng.random() < 0.5 and colour not in {o["colour"] for o in objs[1 - s]}:
                side = 1 - s
            else:
                colour = _pick(rng, [c for c in COLOURS if c not in {o["colour"] for o in objs[s]}])
        return _say(rng, t, side=SIDES[side], a=_article(colour), colour=colour, shape="shape")
    if kind == "contains":
        colour, side = obj["colour"], s
        if not want:  # another colour of that shape (shapes are unique per image) or the other image
            elsewhere = any(o["colour"] == colour and o["shape"] == obj["shape"] for o in objs[1 - s])
            if elsewhere or rng.random() < 0.5:
                colour = _other(rng, list(COLOURS), colour)
            else:
                side = 1 - s
        return _say(rng, t, side=SIDES[side], a=_article(colour), colour=colour, shape=obj["shape"])
    if kind == "count":
        n = len(objs[s]) if want else _other(rng, (1, 2, 3), len(objs[s]))
        return _say(rng, t, side=SIDES[s], **_count_fields(n))
    if kind == "more":
        if len(objs[0]) == len(objs[1]):
            return None
        more = int(len(objs[1]) > len(objs[0]))
        more = more if want else 1 - more  # false: the comparison swapped
        return _say(rng, t, more=SIDES[more], fewer=SIDES[1 - more])
    if kind == "both":
        attr = _pick(rng, ("shape", "colour")) if refer_by == "shape" else "colour"
        have = [{o[attr] for o in objs[k]} for k in (0, 1)]
        options = sorted(have[0] & have[1] if want else have[0] ^ have[1])  # false: in one image only
        if not options:
            return None
        value = _pick(rng, options)
        thing = value if attr == "shape" else f"{value} shape"
        return _say(rng, t, a=_article(thing), thing=thing)
    if kind == "size":
        size = obj["size"] if want else _other(rng, SIZES, obj["size"])
        return _say(rng, t, side=SIDES[s], shape=_noun(obj, refer_by), size=size)
    if kind == "position":
        slot = obj["slot"] if want else _other(rng, SLOTS, obj["slot"])
        return _say(rng, t, side=SIDES[s], shape=_noun(obj, refer_by), where=WHERE[slot])
    raise ValueError(f"unknown NLVR2 statement kind {kind!r}; expected one of {NLVR_TYPES}")


def _nlvr_schedule(rng: np.random.Generator, kinds: tuple[str, ...] = NLVR_TYPES) -> list[tuple[str, bool]]:
    """One block of (kind, true?): every kind once true and once false, true and false alternating."""
    trues = [kinds[int(k)] for k in rng.permutation(len(kinds))]
    falses = [kinds[int(k)] for k in rng.permutation(len(kinds))]
    return [x for pair in zip([(k, True) for k in trues], [(k, False) for k in falses]) for x in pair]


def _nlvr_example(split: str, i: int, item, cfg: PairSynthConfig, folder: Path, rng) -> dict:
    kind, want = item
    for _ in range(_MAX_TRIES):
        scenes = [sample_scene(rng), sample_scene(rng)]
        sentence = _nlvr_statement(kind, scenes, want, rng, cfg.refer_by)
        if sentence is not None:
            break
    else:
        raise RuntimeError(f"no scene pair carries a {want} {kind!r} statement after {_MAX_TRIES} draws")
    names = []
    for k, scene in enumerate(scenes):
        name = f"images/{split}_{i:06d}_img{k}.jpg"
        render_scene(scene, cfg.image_size, rng).save(folder / name, format="JPEG", quality=90)
        names.append(name)
    return {
        "images": names,
        "sentence": sentence,
        "label": "True" if want else "False",
        "truth_type": kind,
        "objects": [_objects(s) for s in scenes],
    }


# -------------------------------------------------------------------------------------------- SNLI-VE
def _ve_statement(
    label: str, kind: str, scene: dict, rng: np.random.Generator, refer_by: str = "shape"
) -> str | None:
    """A hypothesis about the scene with `label` (of VE_LABEL_NAMES) and, unless neutral, of `kind`
    (VE_TYPES); None when this scene cannot carry it. Objects are named by `refer_by` (REFER_BY)."""
    objs = scene["objects"]
    obj = _pick(rng, objs)
    if label == "neutral":  # a present object (its true colour) with a predicate no picture settles
        predicate = _pick(rng, NEUTRAL_PREDICATES)
        if refer_by == "colour":
            return _say(rng, _VE_TEMPLATES["neutral"][:1], shape=_noun(obj, refer_by), predicate=predicate)
        return _say(
            rng, _VE_TEMPLATES["neutral"], shape=obj["shape"], colour=obj["colour"], predicate=predicate
        )
    want = label == "entailment"
    t = _VE_TEMPLATES.get(kind, ())
    if refer_by == "colour" and kind in ("exists", "colour", "size"):
        return _ve_colour_statement(kind, want, objs, obj, rng)
    if kind == "exists":
        colour, shape = obj["colour"], obj["shape"]
        if not want:
            absent = [x for x in SHAPES if x not in {o["shape"] for o in objs}]
            if rng.random() < 0.5:  # a present shape in another colour (colours and shapes are unique)
                colour = _other(rng, list(COLOURS), colour)
            else:  # an absent shape, in any colour
                shape, colour = _pick(rng, absent), _pick(rng, list(COLOURS))
        return _say(rng, t, a=_article(colour), colour=colour, shape=shape)
    if kind == "colour":
        colour = obj["colour"] if want else _other(rng, list(COLOURS), obj["colour"])
        return _say(rng, t, shape=obj["shape"], colour=colour)
    if kind == "size":
        size = obj["size"] if want else _other(rng, SIZES, obj["size"])
        return _say(rng, t, shape=obj["shape"], colour=obj["colour"], size=size)
    if kind == "count":
        n = len(objs) if want else _other(rng, (1, 2, 3), len(objs))
        return _say(rng, t, **_count_fields(n))
    if kind == "position":
        # "in the middle" of a middle object (true) or a side one (false); with three objects also "between"
        # of the middle one (true) or a side one (false). Both survive a horizontal flip.
        options = [("middle", o) for o in objs if (o["slot"] == "middle") == want]
        if len(objs) == 3:
            options += [("between", o) for o in objs if (o["slot"] == "middle") == want]
        if not options:
            return None
        form, o = _pick(rng, options)
        if form == "middle":
            return _say(rng, _VE_TEMPLATES["middle"], shape=_noun(o, refer_by))
        one, other = [_noun(x, refer_by) for x in objs if x is not o]
        if rng.random() < 0.5:
            one, other = other, one
        return _say(rng, _VE_TEMPLATES["between"], shape=_noun(o, refer_by), one=one, other=other)
    raise ValueError(f"unknown SNLI-VE hypothesis kind {kind!r}; expected one of {VE_TYPES}")


def _ve_colour_statement(kind: str, want: bool, objs: list[dict], obj: dict, rng) -> str | None:
    """The exists / colour / size hypotheses of `_ve_statement` with objects named by colour only."""
    present = {o["colour"] for o in objs}
    if kind == "exists":  # "there is a red shape"; false: a colour the image lacks
        colour = obj["colour"] if want else _pick(rng, [c for c in COLOURS if c not in present])
        return _say(rng, _VE_TEMPLATES["exists_colour"], a=_article(colour), colour=colour)
    if kind == "colour":  # the colour of the middle object (a flip keeps the middle slot)
        middle = [o for o in objs if o["slot"] == "middle"]
        if not middle:
            return None
        colour = middle[0]["colour"] if want else _other(rng, list(COLOURS), middle[0]["colour"])
        return _say(rng, _VE_TEMPLATES["colour_middle"], colour=colour)
    size = obj["size"] if want else _other(rng, SIZES, obj["size"])  # kind == "size"
    return _say(rng, _VE_TEMPLATES["size"][:1], shape=_noun(obj, "colour"), size=size)


class _VESchedule:
    """Labels in shuffled blocks of the three; entailment and contradiction kinds in shuffled blocks of
    `kinds` (default VE_TYPES) each (so every kind is as often true as false)."""

    def __init__(self, kinds: tuple[str, ...] = VE_TYPES) -> None:
        self.types = kinds
        self.labels: list[str] = []
        self.kinds: dict[str, list[str]] = {"entailment": [], "contradiction": []}

    def next(self, rng: np.random.Generator) -> tuple[str, str]:
        if not self.labels:
            self.labels = [VE_LABEL_NAMES[int(k)] for k in rng.permutation(3)]
        label = self.labels.pop()
        if label == "neutral":
            return label, "neutral"
        queue = self.kinds[label]
        if not queue:
            queue += [self.types[int(k)] for k in rng.permutation(len(self.types))]
        return label, queue.pop()


def _ve_example(split: str, i: int, item, cfg: PairSynthConfig, folder: Path, rng) -> dict:
    label, kind = item
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng)
        sentence = _ve_statement(label, kind, scene, rng, cfg.refer_by)
        if sentence is not None:
            break
    else:
        raise RuntimeError(f"no scene carries a {label} {kind!r} hypothesis after {_MAX_TRIES} draws")
    name = f"images/{split}_{i:06d}.jpg"
    render_scene(scene, cfg.image_size, rng).save(folder / name, format="JPEG", quality=90)
    return {
        "image": name,
        "sentence": sentence,
        "label": label,
        "hypothesis_type": kind,
        "objects": _objects(scene),
    }


# ----------------------------------------------------------------------------- text-assignment captions
def _ta_caption(scene: dict, rng: np.random.Generator) -> str:
    """A caption of the whole scene naming every object by colour (some with their size), no positions."""
    items = [
        f"{_article(w[0])} {' '.join(w)} shape"
        for w in ([o["size"], o["colour"]] if rng.random() < 0.5 else [o["colour"]] for o in scene["objects"])
    ]
    items = [items[int(k)] for k in rng.permutation(len(items))]  # any order: the loader flips the image
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    bg = scene["background"]
    return _say(
        rng, _TA_TEMPLATES, listed=listed, a_bg=_article(bg), bg=bg, **_count_fields(len(scene["objects"]))
    )


def _ta_example(split: str, i: int, item, cfg: PairSynthConfig, folder: Path, rng) -> dict:
    scene = sample_scene(rng)
    name = f"images/{split}_{i:06d}.jpg"
    render_scene(scene, cfg.image_size, rng).save(folder / name, format="JPEG", quality=90)
    captions = list(dict.fromkeys(_ta_caption(scene, rng) for _ in range(3)))  # up to 3 distinct
    return {"image": name, "caption": captions, "image_id": f"{split}_{i:06d}", "objects": _objects(scene)}


# ------------------------------------------------------------------------------------------- the sets
def _objects(scene: dict) -> list[dict]:
    return [{k: o[k] for k in ("shape", "colour", "size", "box")} for o in scene["objects"]]


@dataclasses.dataclass(frozen=True)
class _Task:
    key: str  # signature section, seed stream
    what: str  # for messages
    schedule: Callable[[tuple[str, ...]], Callable[[np.random.Generator], object]]  # per split, of kinds
    example: Callable[..., dict]
    kinds: tuple[str, ...]  # every statement kind (the default selection)


def _nlvr_items(kinds: tuple[str, ...]) -> Callable[[np.random.Generator], object]:
    queue: list = []

    def next_item(rng: np.random.Generator):
        if not queue:
            queue.extend(reversed(_nlvr_schedule(rng, kinds)))
        return queue.pop()

    return next_item


def _ve_items(kinds: tuple[str, ...]) -> Callable[[np.random.Generator], object]:
    return _VESchedule(kinds).next


_NLVR = _Task("nlvr2", "synthetic NLVR2 set", _nlvr_items, _nlvr_example, NLVR_TYPES)
_VE = _Task("ve", "synthetic SNLI-VE set", _ve_items, _ve_example, VE_TYPES)
_TA = _Task("ta", "synthetic text-assignment set", lambda kinds: lambda rng: None, _ta_example, ("caption",))


def _kinds(task: _Task, cfg: PairSynthConfig) -> tuple[str, ...]:
    bad = [k for k in cfg.kinds if k not in task.kinds]
    if bad or len(set(cfg.kinds)) != len(cfg.kinds):
        raise ValueError(
            f"{task.what}: synth.kinds {list(cfg.kinds)} must be distinct kinds of {list(task.kinds)} "
            f"(unknown: {bad})"
        )
    return tuple(cfg.kinds) or task.kinds


_OUR_FILES = {"images", *(f"{s}.json" for s in SPLITS), "DONE"}


def _signature(task: _Task, cfg: PairSynthConfig) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}  # a moved set stays valid
    return {
        "generator_version": GENERATOR_VERSION,
        "synth_generator_version": SYNTH_GENERATOR_VERSION,  # the drawing code it shares
        "synth_vqa_generator_version": SYNTH_VQA_GENERATOR_VERSION,  # the scenes it shares
        f"synth_{task.key}": fields,
    }


def _ready(task: _Task, cfg: PairSynthConfig) -> bool:
    try:
        return json.loads((Path(cfg.out_dir) / "DONE").read_text()) == _signature(task, cfg)
    except (OSError, ValueError):
        return False


def synthetic_nlvr2_ready(cfg: PairSynthConfig) -> bool:
    """True when cfg.out_dir holds a complete synthetic NLVR2 set generated with these settings."""
    return _ready(_NLVR, cfg)


def synthetic_ta_ready(cfg: PairSynthConfig) -> bool:
    """True when cfg.out_dir holds a complete synthetic text-assignment set generated with these settings."""
    return _ready(_TA, cfg)


def synthetic_ve_ready(cfg: PairSynthConfig) -> bool:
    """True when cfg.out_dir holds a complete synthetic SNLI-VE set generated with these settings."""
    return _ready(_VE, cfg)


def _generate(task: _Task, cfg: PairSynthConfig, *, progress: bool, force: bool) -> Path:
    out = Path(cfg.out_dir)
    if not force and _ready(task, cfg):
        logger.info("%s in %s is up to date", task.what, out)
        return out
    if cfg.num_train < 1 or cfg.num_val < 0 or cfg.num_test < 0:
        raise ValueError(
            f"{task.what} needs num_train >= 1, num_val >= 0 and num_test >= 0; got {cfg.num_train}, "
            f"{cfg.num_val}, {cfg.num_test}"
        )
    if cfg.image_size < 32:
        raise ValueError(
            f"{task.what} needs image_size >= 32 (three objects side by side), got {cfg.image_size}"
        )
    kinds = _kinds(task, cfg)
    if cfg.refer_by not in REFER_BY:
        raise ValueError(f"{task.what}: synth.refer_by must be one of {list(REFER_BY)}, got {cfg.refer_by!r}")
    counts = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    with staged_folder(out, _OUR_FILES, lambda: _ready(task, cfg), task.what) as tmp:
        bar = tqdm(total=sum(counts.values()), desc=task.what, disable=not progress)
        with bar:
            for k, split in enumerate(SPLITS):
                # Independent seed streams: one split's draws never shift another's when counts change.
                rng = np.random.default_rng([cfg.seed, _STREAMS[task.key], k])
                next_item = task.schedule(kinds)
                records = []
                for i in range(counts[split]):
                    records.append(task.example(split, i, next_item(rng), cfg, tmp, rng))
                    bar.update(1)
                (tmp / f"{split}.json").write_text(json.dumps(records, indent=0))
        (tmp / "DONE").write_text(json.dumps(_signature(task, cfg)))
    logger.info(
        "%s: %d/%d/%d train/val/test examples, images of %d px, in %s",
        task.what,
        cfg.num_train,
        cfg.num_val,
        cfg.num_test,
        cfg.image_size,
        out,
    )
    return out


def generate_synthetic_nlvr2(cfg: PairSynthConfig, *, progress: bool = True, force: bool = False) -> Path:
    """Write the synthetic NLVR2 set into cfg.out_dir and return that path; reuses a complete matching set.

    Layout: images/{split}_NNNNNN_img{0,1}.jpg, {train,val,test}.json (cfg.num_* records each: "images"
    [left, right] relative to the JSON's folder, "sentence", "label" "True" | "False", plus "truth_type" and
    "objects", see the module docstring) and, last, DONE (the settings). Written to a sibling temporary
    folder and renamed into place, so a half-written set never looks complete; a folder holding anything but
    these files is refused, never overwritten.
    """
    return _generate(_NLVR, cfg, progress=progress, force=force)


def generate_synthetic_ve(cfg: PairSynthConfig, *, progress: bool = True, force: bool = False) -> Path:
    """Write the synthetic SNLI-VE set into cfg.out_dir and return that path; reuses a complete matching
    set.

    Layout: images/{split}_NNNNNN.jpg, {train,val,test}.json (cfg.num_* records each, one image per record:
    "image" relative to the JSON's folder, "sentence", "label" "entailment" | "neutral" | "contradiction",
    plus "hypothesis_type" and "objects", see the module docstring) and, last, DONE (the settings); staged
    and guarded like `generate_synthetic_nlvr2`.
    """
    return _generate(_VE, cfg, progress=progress, force=force)


def generate_synthetic_ta(cfg: PairSynthConfig, *, progress: bool = True, force: bool = False) -> Path:
    """Write a caption set for NLVR2's text-assignment pre-training into cfg.out_dir and return that path;
    reuses a complete matching set.

    The NLVR2 scenes (one to three objects), each with up to three captions that name every object by
    colour, some with its size ("the image shows a red shape and a small blue shape"), in the pre-training
    layout: images/{split}_NNNNNN.jpg, {train,val,test}.json (cfg.num_* records of "image", "caption" [...],
    "image_id", "objects") and DONE; staged and guarded like `generate_synthetic_nlvr2`. TA draws each
    caption's partner images from the in-batch image similarities: partners share most colours, so a
    caption settles which image is its own only when every colour is checked. No positions are named (the
    pre-training transform flips); cfg.kinds and cfg.refer_by are not used.
    """
    return _generate(_TA, cfg, progress=progress, force=force)
