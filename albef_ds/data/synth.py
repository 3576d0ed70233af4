"""An embedded, learnable synthetic image-text set for debug runs and tests.

Each image shows one object (shape, colour, size, vertical position) on a textured, muted background; its
captions name those attributes through several templates. Held-out images come from the same distribution
(another seed stream), so image-text retrieval on them is learnable by a small model in minutes.

Only vertical positions are named: pre-training flips images horizontally, which would make "left"/"right"
captions wrong half of the time.

With `synth.objects=2` (the demo's set, configs/debug.yaml; issue 16) each image shows two objects of
distinct colours, each small or large, one in the upper and one in the lower half of a plain background, and
every caption names both colours with their sizes in one structure ("a large red shape and a small blue
shape"; the noun one of shape / object / thing / one), in either order, and nothing else: every word is one
the debug ViT can see, and a model that knows the colours alone ranks the right caption first for about a
seventh of the held-out images (the sizes settle most of the rest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..config import SynthConfig
from .text import clean_caption, train_wordpiece_vocab

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the images or captions change, so stale sets are regenerated

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 175, 45),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 35),
    "purple": (140, 45, 175),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {  # muted colours, named in some captions
    "grey": (128, 128, 128),
    "brown": (125, 90, 60),
    "teal": (55, 120, 120),
    "beige": (205, 190, 155),
    "olive": (110, 110, 55),
}
TEXTURES = ("plain", "striped", "checkered", "dotted")
SIZES = ("small", "large")
POSITIONS = ("top", "middle", "bottom")

_MIN_CONTRAST = 120.0  # least RGB distance between object and background colour (rejection-sampled)
_POS_Y = {"top": 0.25, "middle": 0.5, "bottom": 0.75}  # object centre, fraction of the image side
_RADIUS = {"small": (0.13, 0.16), "large": (0.24, 0.28)}  # object half-extent range, fraction of the side
_AT = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
_NEAR = {"top": "near the top", "middle": "near the middle", "bottom": "near the bottom"}

# Each template names colour and shape; the others add size, position, texture and background colour.
# Some carry capitals and punctuation on purpose: captions go through clean_caption like real data.
_TEMPLATES = (
    "{a_size} {size} {colour} {shape} {at}",
    "{size} {colour} {shape} {at} of a {texture} background",
    "there is {a_colour} {colour} {shape} {near} on a {texture} {bg} background",
    "a picture of {a_colour} {colour} {shape} on {a_bg} {bg} background",
    "the {shape} is {colour} and {size}",
    "A {size} {colour} {shape}, on a {texture} {bg} backdrop.",
    "{bg} {texture} background with {a_size} {size} {colour} {shape} {at}",
    "an image showing {a_colour} {colour} {shape} {near}",
    "{colour} {shape} ({size}) {at}",
)


# Two-object captions: both objects by size and colour, the first-named one in {c1}/{s1}, in one structure
# with four nouns. Templates of different structures gave the ITM a per-template offset of its logit
# (issue 16: one of nine templates was the top-1 text for 73 of 200 held-out images), which cancels in
# image retrieval but not in text retrieval; with one structure no template can be favoured.
_PAIR_TEMPLATES = tuple(
    f"{{a1}} {{s1}} {{c1}} {noun} and {{a2}} {{s2}} {{c2}} {noun}" for noun in ("shape", "object", "thing", "one")
)
_PAIR_RADIUS = {"small": (0.09, 0.11), "large": (0.19, 0.22)}  # half-extent, fraction of the side
_PAIR_Y = {"top": 0.27, "bottom": 0.73}  # object centres, fraction of the side


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def contrasting_backgrounds(colours: list[str] | tuple[str, ...]) -> list[str]:
    """The background names (in BACKGROUNDS order) far enough from every object colour named in `colours`."""
    objs = [np.array(COLOURS[c], dtype=np.float64) for c in colours]
    return [
        b
        for b, c in BACKGROUNDS.items()
        if all(np.linalg.norm(np.subtract(c, obj)) >= _MIN_CONTRAST for obj in objs)
    ]


def _sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    colour = str(rng.choice(list(COLOURS)))
    bgs = contrasting_backgrounds([colour])
    return {
        "shape": str(rng.choice(SHAPES)),
        "colour": colour,
        "size": str(rng.choice(SIZES)),
        "position": str(rng.choice(POSITIONS)),
        "texture": str(rng.choice(TEXTURES)),
        "background": str(rng.choice(bgs)),
    }


def _captions(attrs: dict[str, str], n: int, rng: np.random.Generator) -> list[str]:
    fields = {
        "shape": attrs["shape"],
        "colour": attrs["colour"],
        "size": attrs["size"],
        "texture": attrs["texture"],
        "bg": attrs["background"],
        "at": _AT[attrs["position"]],
        "near": _NEAR[attrs["position"]],
        "a_size": _article(attrs["size"]),
        "a_colour": _article(attrs["colour"]),
        "a_bg": _article(attrs["background"]),
    }
    picks = rng.choice(len(_TEMPLATES), size=n, replace=False)  # n distinct templates per image
    return [_TEMPLATES[int(k)].format(**fields) for k in picks]


def _sample_pair(rng: np.random.Generator) -> dict:
    colours = [str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)]
    places = ["top", "bottom"] if rng.random() < 0.5 else ["bottom", "top"]
    objects = [
        {"colour": c, "size": str(rng.choice(SIZES)), "shape": str(rng.choice(SHAPES)), "position": p}
        for c, p in zip(colours, places)
    ]
    bgs = contrasting_backgrounds(colours) or ["grey"]  # no background contrasts with both: grey
    return {"objects": objects, "background": str(rng.choice(bgs)), "texture": "plain"}


def _pair_captions(attrs: dict, n: int, rng: np.random.Generator) -> list[str]:
    caps = []
    for k in rng.choice(len(_PAIR_TEMPLATES), size=n, replace=False):  # n distinct templates per image
        first, second = attrs["objects"] if rng.random() < 0.5 else attrs["objects"][::-1]
        fields = {
            "c1": first["colour"],
            "s1": first["size"],
            "a1": _article(first["size"]),
            "c2": second["colour"],
            "s2": second["size"],
            "a2": _article(second["size"]),
        }
        caps.append(_PAIR_TEMPLATES[int(k)].format(**fields))
    return caps


def _draw_pair(img: Image.Image, attrs: dict, rng: np.random.Generator) -> None:
    s = img.size[0]
    for obj in attrs["objects"]:
        r = s * float(rng.uniform(*_PAIR_RADIUS[obj["size"]]))
        cx = s * (0.5 + float(rng.uniform(-0.2, 0.2)))
        cy = s * (_PAIR_Y[obj["position"]] + float(rng.uniform(-0.02, 0.02)))
        cx = min(max(cx, r + 1), s - r - 1)
        cy = min(max(cy, r + 1), s - r - 1)
        obj["box"] = [round(v, 2) for v in shape_box(obj["shape"], (cx, cy), r)]
        draw_shape(img, obj["shape"], (cx, cy), r, object_colour(obj["colour"], rng))


def _vocab_texts(attrs: dict, rng: np.random.Generator) -> list[str]:
    """Texts the vocabulary is trained on besides the captions, for a two-object image: one-object captions
    of each of its objects (with a random texture), so the words of the other synthetic sets that share
    this vocabulary (shapes, textures, backgrounds, positions) stay whole pieces."""
    out = []
    for obj in attrs["objects"]:
        one = {**obj, "texture": str(rng.choice(TEXTURES)), "background": attrs["background"]}
        out += _captions(one, 3, rng)
    return out


def textured_background(background: str, texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A `texture` pattern in shades of the BACKGROUNDS colour `background`, uint8 [size, size, 3]."""
    base = np.array(BACKGROUNDS[background], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]  # [S, S] pixel coordinates
    period = int(rng.integers(max(4, size // 12), max(6, size // 6) + 1))
    phase = int(rng.integers(0, period))
    if texture == "striped":
        axis = yy if rng.random() < 0.5 else xx
        pattern = ((axis + phase) // (period // 2 or 1)) % 2
    elif texture == "checkered":
        pattern = (((yy + phase) // period) + ((xx + phase) // period)) % 2
    elif texture == "dotted":
        cy = (yy + phase) % period - period / 2
        cx = (xx + phase) % period - period / 2
        pattern = (cy * cy + cx * cx) <= (period / 4) ** 2
    else:
        pattern = np.zeros((size, size), dtype=bool)
    # Texture as a darker shade of the background colour: visible, but far weaker than the object contrast.
    img = base[None, None, :] * np.where(pattern[..., None].astype(bool), 0.72, 1.0)  # [S, S, 3]
    img = img + rng.normal(0.0, 4.0, size=img.shape)  # sensor-like noise, so JPEGs are not trivially flat
    return np.clip(img, 0, 255).astype(np.uint8)


def object_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """The RGB fill of a COLOURS entry with a small random jitter, so a colour is a cluster, not a point."""
    jitter = rng.integers(-12, 13, size=3)
    return tuple(int(v) for v in np.clip(np.add(COLOURS[colour], jitter), 0, 255))


def shape_box(shape: str, centre: tuple[float, float], radius: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the extent `draw_shape` fills for this shape, centre (x, y) and radius."""
    cx, cy = centre
    if shape == "square":
        h = radius * 0.85
        return (cx - h, cy - h, cx + h, cy + h)
    if shape == "triangle":
        return (cx - radius, cy - radius, cx + radius, cy + 0.8 * radius)
    return (cx - radius, cy - radius, cx + radius, cy + radius)


def draw_shape(
    img: Image.Image, shape: str, centre: tuple[float, float], radius: float, fill: tuple[int, int, int]
) -> None:
    """Draw one of SHAPES filled with `fill`, centred at (x, y) with half-extent `radius` (pixels)."""
    cx, cy = centre
    r = radius
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":  # a plus sign of two bars
        t = r * 0.33
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw_object(img: Image.Image, attrs: dict[str, str], rng: np.random.Generator) -> None:
    s = img.size[0]
    lo, hi = _RADIUS[attrs["size"]]
    r = s * float(rng.uniform(lo, hi))
    cy = s * (_POS_Y[attrs["position"]] + float(rng.uniform(-0.03, 0.03)))
    cx = s * (0.5 + float(rng.uniform(-0.15, 0.15)))  # small horizontal jitter (position is vertical only)
    cx = min(max(cx, r + 1), s - r - 1)
    cy = min(max(cy, r + 1), s - r - 1)
    draw_shape(img, attrs["shape"], (cx, cy), r, object_colour(attrs["colour"], rng))


def _make_split(
    split: str, count: int, cfg: SynthConfig, folder: Path, rng: np.random.Generator, bar: tqdm | None
) -> list[dict]:
    entries = []
    pair = cfg.objects == 2
    for i in range(count):
        attrs = _sample_pair(rng) if pair else _sample_attributes(rng)
        n_caps = 3 if split == "train" else int(rng.integers(2, 4))  # eval: 2-3 captions per image
        captions = (_pair_captions if pair else _captions)(attrs, n_caps, rng)
        img = Image.fromarray(textured_background(attrs["background"], attrs["texture"], cfg.image_size, rng))
        (_draw_pair if pair else _draw_object)(img, attrs, rng)
        name = f"images/{split}_{i:06d}.jpg"
        img.save(folder / name, format="JPEG", quality=90)
        entries.append(
            {"image": name, "caption": captions, "image_id": f"{split}_{i:06d}", "attributes": attrs}
        )
        if bar is not None:
            bar.update(1)
    return entries


def _signature(cfg: SynthConfig) -> dict:
    # out_dir is where the set lives, not what it holds: leave it out so a moved set stays valid.
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}
    return {"generator_version": GENERATOR_VERSION, "synth": fields}


def synthetic_ready(cfg: SynthConfig) -> bool:
    """True when cfg.out_dir holds a complete set generated with these settings."""
    done = Path(cfg.out_dir) / "DONE"
    try:
        return json.loads(done.read_text()) == _signature(cfg)
    except (OSError, ValueError):
        return False


_OUR_FILES = {"images", "train.json", "eval.json", "vocab.txt", "DONE"}


@contextlib.contextmanager
def staged_folder(out: Path, our_files: set[str], is_ready: Callable[[], bool], what: str) -> Iterator[Path]:
    """Write a generated data set into a sibling temporary folder (yielded, with an images/ folder) that
    replaces `out` when the block completes and is removed when it raises: a half-written set never looks
    complete. `out` may only hold `our_files` (a stale set of ours), else it is refused; if another process
    completed the same set first (`is_ready`), theirs is kept."""
    if out.exists() and not (out.is_dir() and set(os.listdir(out)) <= our_files):
        raise FileExistsError(f"{out} exists and does not look like a {what}; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)  # a stale set of ours (checked above)
        try:
            tmp.rename(out)
        except OSError:
            if not is_ready():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generate_synthetic(cfg: SynthConfig, *, progress: bool = True, force: bool = False) -> Path:
    """Write the synthetic set into cfg.out_dir and return that path; reuses a complete matching set.

    Layout: images/{train,eval}_NNNNNN.jpg, train.json (3 captions per image), eval.json (2-3 captions per
    image; each record's "attributes" are what the generator drew: one object's, or with `objects=2`
    {"objects": [{colour, size, shape, position, box}, ...], "background", "texture"}), vocab.txt
    (WordPiece over all captions; with `objects=2` also over one-object captions of the same objects, so
    the other synthetic sets' words stay whole pieces) and, last, DONE (the settings). Everything is written
    to a sibling temporary folder first and renamed into place, so a half-written set never looks complete.
    """
    out = Path(cfg.out_dir)
    if not force and synthetic_ready(cfg):
        logger.info("synthetic set in %s is up to date", out)
        return out
    if cfg.num_train < 1 or cfg.num_eval < 1 or cfg.image_size < 16:
        raise ValueError(
            f"synthetic set needs num_train >= 1, num_eval >= 1 and image_size >= 16; got "
            f"{cfg.num_train}, {cfg.num_eval}, {cfg.image_size}"
        )
    if cfg.objects not in (1, 2):
        raise ValueError(f"synth.objects must be 1 or 2 (objects per image), got {cfg.objects!r}")
    with staged_folder(out, _OUR_FILES, lambda: synthetic_ready(cfg), "synthetic set") as tmp:
        # Independent seed streams: train and eval draws never shift each other when counts change.
        rng_train = np.random.default_rng([cfg.seed, 0])
        rng_eval = np.random.default_rng([cfg.seed, 1])
        bar = tqdm(total=cfg.num_train + cfg.num_eval, desc="synthetic images", disable=not progress)
        with bar:
            train = _make_split("train", cfg.num_train, cfg, tmp, rng_train, bar)
            held_out = _make_split("eval", cfg.num_eval, cfg, tmp, rng_eval, bar)
        (tmp / "train.json").write_text(json.dumps(train, indent=0))
        (tmp / "eval.json").write_text(json.dumps(held_out, indent=0))
        # The model only ever sees cleaned captions, so the vocabulary is trained on those.
        texts = [clean_caption(c, 30) for e in train + held_out for c in e["caption"]]
        if cfg.objects == 2:
            rng_vocab = np.random.default_rng([cfg.seed, 2])
            texts += [clean_caption(c, 30) for e in train for c in _vocab_texts(e["attributes"], rng_vocab)]
        train_wordpiece_vocab(texts, tmp / "vocab.txt", cfg.vocab_size)
        (tmp / "DONE").write_text(json.dumps(_signature(cfg)))
    logger.info(
        "synthetic set: %d train and %d eval images of %d px in %s",
        cfg.num_train,
        cfg.num_eval,
        cfg.image_size,
        out,
    )
    return out
