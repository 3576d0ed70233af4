"""A generated VQA set: questions about images of one to three objects, in the VQA v2 / ALBEF JSON layout.

The images use the look of the synthetic image-text set (`synth`: its shapes, colours, textured muted
backgrounds and contrast rule). Each image holds 1-3 objects of distinct shapes and distinct colours, each in
its own horizontal slot (left / middle / right) and small or large, so every question below has one answer:

========  =====================================  =======================================
type      example question                       answers
========  =====================================  =======================================
colour    What colour is the circle?             the 8 colour names of `synth.COLOURS`
shape     What shape is the red one?             the 5 names of `synth.SHAPES`
size      Is the square small or large?          small, large
position  Where is the circle?                   left, middle, right
count     How many shapes are there?             one, two, three
exists    Is there a red circle?                 yes, no (alternating: balanced exactly)
========  =====================================  =======================================

Question types come in shuffled blocks of all six per split, so they are balanced to within one block.
"left" and "right" are the only words that a horizontal flip contradicts (in questions and answers alike),
so a fine-tuning that flips an image and swaps those two words keeps every record true; "middle" survives
a flip as it is.

Counts are answered as words, not digits: the debug vocabulary (WordPiece trained on `synth`'s captions)
has no digit characters, so "1", "2" and "3" would all be [UNK] and no model could tell them apart. VQA's
answer normalisation maps "two" to "2", so a predicted "two" still matches annotators who wrote "2".

Every question has 10 "human" answers drawn from a seeded RNG: most annotators give the true answer, the
others a plausible confusion (a neighbouring colour, a similar shape, the adjacent slot, an off-by-one
count, the digit written for a number word, "big" for large, ...); about one question in ten has a split
vote. The true answer is always strictly the most frequent of the 10 (also after VQA normalisation: no two
distinct confusions of one question normalise to the same string).

Record fields: ``image`` (relative to the JSON's folder), ``question``, ``answer`` (the 10 answers),
``dataset`` ("vqa"), ``question_id`` (int, unique across the three splits), plus fields the loaders ignore:
``question_type`` (one of QUESTION_TYPES), ``truth`` (the generator's answer) and ``objects``
([{"shape", "colour", "size", "box": [x0, y0, x1, y1]}] left to right, box in pixels) for checks and
grounding. Test records keep their answers, so a local check of a test-answer file is possible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..config import VQASynthConfig
from .synth import (
    COLOURS,
    SHAPES,
    SIZES,
    TEXTURES,
    contrasting_backgrounds,
    draw_shape,
    object_colour,
    shape_box,
    staged_folder,
    textured_background,
)
from .synth import GENERATOR_VERSION as SYNTH_GENERATOR_VERSION

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the images, questions or answers change, so stale sets are regenerated

SPLITS = ("train", "val", "test")
QUESTION_TYPES = ("colour", "shape", "size", "position", "count", "exists")
SLOTS = ("left", "middle", "right")
COUNT_WORDS = ("one", "two", "three")
# Every answer the generator can give, per question type; answer_list.json holds all of them.
TRUE_ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": SLOTS,
    "count": COUNT_WORDS,
    "exists": ("yes", "no"),
}
NUM_ANSWERS = 10  # human answers per question, as in VQA v2

_SLOT_X = {"left": 1 / 6, "middle": 1 / 2, "right": 5 / 6}  # slot centre, fraction of the image side
# Object half-extent ranges (fraction of the side): a large object still fits inside its third of the image.
_RADIUS = {"small": (0.075, 0.095), "large": (0.13, 0.155)}
_STREAM = 7  # seed-stream key of this generator (synth.py uses [seed, split]), then the split index

# Wrong answers annotators give: plausible confusions, synonyms and other spellings of the true answer.
# At most one entry per question normalises like the truth (a digit), none like each other.
_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "red": ("orange", "purple"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "white"),
    "green": ("blue", "yellow"),
    "blue": ("purple", "green"),
    "purple": ("blue", "red"),
    "white": ("yellow", "grey"),
    "black": ("purple", "blue"),
    "circle": ("diamond", "square"),
    "square": ("diamond", "cross"),
    "triangle": ("diamond", "cross"),
    "diamond": ("square", "triangle"),
    "cross": ("plus", "square"),
    "small": ("large", "tiny"),
    "large": ("small", "big"),
    "left": ("middle", "right"),
    "middle": ("left", "right"),
    "right": ("middle", "left"),
    "one": ("1", "two"),
    "two": ("2", "one", "three"),
    "three": ("3", "two"),
    "yes": ("no",),
    "no": ("yes",),
}

# (template, the slots it suits): "left or right" questions only about objects that are not in the middle.
_TEMPLATES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "colour": (
        ("What colour is the {shape}?", SLOTS),
        ("What color is the {shape}?", SLOTS),
        ("Which colour is the {shape}?", SLOTS),
        ("The {shape} is what colour?", SLOTS),
    ),
    "shape": (
        ("What shape is the {colour} one?", SLOTS),
        ("Which shape is {colour}?", SLOTS),
        ("What is the {colour} shape?", SLOTS),
    ),
    "size": (
        ("Is the {shape} small or large?", SLOTS),
        ("Is the {shape} large or small?", SLOTS),
        ("How big is the {shape}?", SLOTS),
    ),
    "position": (
        ("Where is the {shape}?", SLOTS),
        ("Is the {shape} on the left, in the middle or on the right?", SLOTS),
        ("Is the {shape} on the left or the right?", ("left", "right")),
        ("Which side is the {shape} on?", ("left", "right")),
    ),
    "count": (
        ("How many shapes are there?", SLOTS),
        ("How many shapes are in the picture?", SLOTS),
        ("How many shapes can you see?", SLOTS),
    ),
    "exists": (
        ("Is there {a_colour} {colour} {shape}?", SLOTS),
        ("Is there {a_colour} {colour} {shape} in the picture?", SLOTS),
        ("Do you see {a_colour} {colour} {shape}?", SLOTS),
    ),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(len(options)))])


def sample_scene(rng: np.random.Generator) -> dict:
    """Objects (distinct slots, shapes and colours, left to right), background and texture (also the scenes
    of `synth_pairs`)."""
    n = int(rng.integers(1, 4))
    slots = sorted(int(k) for k in rng.choice(len(SLOTS), size=n, replace=False))
    shapes = [str(s) for s in rng.choice(SHAPES, size=n, replace=False)]
    while True:  # rejection-sample colours until one background contrasts with all of them
        colours = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
        backgrounds = contrasting_backgrounds(colours)
        if backgrounds:
            break
    objects = [
        {"shape": shapes[i], "colour": colours[i], "size": _pick(rng, SIZES), "slot": SLOTS[slots[i]]}
        for i in range(n)
    ]
    return {"objects": objects, "background": _pick(rng, backgrounds), "texture": _pick(rng, TEXTURES)}


def render_scene(scene: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene; adds each object's "box" [x0, y0, x1, y1] (pixels) to it."""
    img = Image.fromarray(textured_background(scene["background"], scene["texture"], size, rng))
    for obj in scene["objects"]:
        lo, hi = _RADIUS[obj["size"]]
        r = size * float(rng.uniform(lo, hi))
        room = max(0.0, size / 6 - r - 1)  # horizontal jitter that keeps the object inside its third
        cx = size * _SLOT_X[obj["slot"]] + float(rng.uniform(-room, room))
        cy = size * float(rng.uniform(0.3, 0.7))
        cy = min(max(cy, r + 1), size - r - 1)
        draw_shape(img, obj["shape"], (cx, cy), r, object_colour(obj["colour"], rng))
        obj["box"] = [round(v, 2) for v in shape_box(obj["shape"], (cx, cy), r)]
    return img


def _question(qtype: str, scene: dict, rng: np.random.Generator, want_yes: bool) -> tuple[str, str]:
    """(question, true answer) of type `qtype` about a random object of the scene."""
    objects = scene["objects"]
    obj = objects[int(rng.integers(len(objects)))]
    if qtype == "count":
        truth = COUNT_WORDS[len(objects) - 1]
    elif qtype == "exists":
        colour, shape = obj["colour"], obj["shape"]
        if not want_yes:  # a hard negative: one attribute of a present object, the other changed
            if rng.random() < 0.5:
                colour = _pick(rng, [c for c in COLOURS if c != obj["colour"]])
            else:
                shape = _pick(rng, [s for s in SHAPES if s != obj["shape"]])
        obj = {"colour": colour, "shape": shape}  # shapes and colours are unique: absent iff changed
        truth = "yes" if want_yes else "no"
    else:
        attribute = {"colour": "colour", "shape": "shape", "size": "size", "position": "slot"}[qtype]
        truth = obj[attribute]
    templates = [t for t, slots in _TEMPLATES[qtype] if qtype != "position" or obj["slot"] in slots]
    text = _pick(rng, templates).format(
        shape=obj["shape"], colour=obj["colour"], a_colour=_article(obj["colour"])
    )
    return text, truth


def _human_answers(truth: str, rng: np.random.Generator) -> list[str]:
    """10 annotators' answers whose most frequent one is `truth` (strictly)."""
    alternatives = _CONFUSIONS[truth]
    u = rng.random()
    if u < 0.1:  # a split vote; with a single alternative, as split as a strict majority allows
        n_true = int(rng.integers(4, 6)) if len(alternatives) > 1 else 6
    elif u < 0.45:
        n_true = int(rng.integers(6, 9))
    else:
        n_true = int(rng.integers(9, NUM_ANSWERS + 1))
    others = [_pick(rng, alternatives) for _ in range(NUM_ANSWERS - n_true)]
    while others:  # convert the most frequent wrong answer until the truth leads strictly
        wrong, count = Counter(others).most_common(1)[0]
        if count < n_true:
            break
        others.remove(wrong)
        n_true += 1
    answers = [truth] * n_true + others
    return [answers[int(k)] for k in rng.permutation(NUM_ANSWERS)]


def _make_split(
    split: str,
    count: int,
    cfg: VQASynthConfig,
    folder: Path,
    rng: np.random.Generator,
    first_qid: int,
    bar: tqdm | None,
) -> list[dict]:
    records = []
    types: list[str] = []  # the queue of question types: shuffled blocks of all six
    n_exists = 0
    qid = first_qid
    for i in range(count):
        scene = sample_scene(rng)
        img = render_scene(scene, cfg.image_size, rng)
        name = f"images/{split}_{i:06d}.jpg"
        img.save(folder / name, format="JPEG", quality=90)
        objects = [{k: o[k] for k in ("shape", "colour", "size", "box")} for o in scene["objects"]]
        for _ in range(cfg.questions_per_image):
            if not types:
                types = [QUESTION_TYPES[int(k)] for k in rng.permutation(len(QUESTION_TYPES))]
            qtype = types.pop()
            question, truth = _question(qtype, scene, rng, want_yes=n_exists % 2 == 0)
            n_exists += qtype == "exists"
            records.append(
                {
                    "image": name,
                    "question": question,
                    "answer": _human_answers(truth, rng),
                    "dataset": "vqa",
                    "question_id": qid,
                    "question_type": qtype,
                    "truth": truth,
                    "objects": objects,
                }
            )
            qid += 1
        if bar is not None:
            bar.update(1)
    return records


def answer_list(train_records: list[dict]) -> list[str]:
    """The candidate answers: the most common answer of every training question and every answer the
    generator can give (so each val/test truth is rankable), sorted and unique."""
    majority = {Counter(r["answer"]).most_common(1)[0][0] for r in train_records}
    return sorted(majority | {a for answers in TRUE_ANSWERS.values() for a in answers})


def _signature(cfg: VQASynthConfig) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}  # a moved set stays valid
    return {
        "generator_version": GENERATOR_VERSION,
        "synth_generator_version": SYNTH_GENERATOR_VERSION,  # the drawing code it shares
        "synth_vqa": fields,
    }


def synthetic_vqa_ready(cfg: VQASynthConfig) -> bool:
    """True when cfg.out_dir holds a complete synthetic VQA set generated with these settings."""
    try:
        return json.loads((Path(cfg.out_dir) / "DONE").read_text()) == _signature(cfg)
    except (OSError, ValueError):
        return False


_OUR_FILES = {"images", *(f"{s}.json" for s in SPLITS), "answer_list.json", "DONE"}


def generate_synthetic_vqa(cfg: VQASynthConfig, *, progress: bool = True, force: bool = False) -> Path:
    """Write the synthetic VQA set into cfg.out_dir and return that path; reuses a complete matching set.

    Layout: images/{train,val,test}_NNNNNN.jpg, {train,val,test}.json (cfg.questions_per_image questions per
    image, fields in the module docstring), answer_list.json and, last, DONE (the settings). Everything is
    written to a sibling temporary folder first and renamed into place, so a half-written set never looks
    complete; a folder holding anything but these files is refused, never overwritten.
    """
    out = Path(cfg.out_dir)
    if not force and synthetic_vqa_ready(cfg):
        logger.info("synthetic VQA set in %s is up to date", out)
        return out
    if cfg.num_train < 1 or cfg.num_val < 0 or cfg.num_test < 0:
        raise ValueError(
            f"synthetic VQA needs num_train >= 1, num_val >= 0 and num_test >= 0; got {cfg.num_train}, "
            f"{cfg.num_val}, {cfg.num_test}"
        )
    if cfg.questions_per_image < 1 or cfg.image_size < 32:
        raise ValueError(
            "synthetic VQA needs questions_per_image >= 1 and image_size >= 32 (three objects side by "
            f"side); got {cfg.questions_per_image}, {cfg.image_size}"
        )
    counts = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    ready = lambda: synthetic_vqa_ready(cfg)  # noqa: E731
    with staged_folder(out, _OUR_FILES, ready, "synthetic VQA set") as tmp:
        bar = tqdm(total=sum(counts.values()), desc="synthetic VQA images", disable=not progress)
        splits = {}
        qid = 1  # question ids run on across the splits, so they are unique in the whole set
        with bar:
            for k, split in enumerate(SPLITS):
                # Independent seed streams: one split's draws never shift another's when counts change.
                rng = np.random.default_rng([cfg.seed, _STREAM, k])
                splits[split] = _make_split(split, counts[split], cfg, tmp, rng, qid, bar)
                qid += len(splits[split])
        for split, records in splits.items():
            (tmp / f"{split}.json").write_text(json.dumps(records, indent=0))
        (tmp / "answer_list.json").write_text(json.dumps(answer_list(splits["train"]), indent=0))
        (tmp / "DONE").write_text(json.dumps(_signature(cfg)))
    logger.info(
        "synthetic VQA set: %d/%d/%d train/val/test images of %d px, %d questions each, in %s",
        cfg.num_train,
        cfg.num_val,
        cfg.num_test,
        cfg.image_size,
        cfg.questions_per_image,
        out,
    )
    return out
