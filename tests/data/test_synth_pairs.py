"""synth_pairs.py: the generated NLVR2 and SNLI-VE sets (layouts, balance, labels re-derived from the recorded
objects, determinism, safety, vocabulary) and the acceptance test of NLVR2's flip-swap: a left/right
statement stays true after the loader mirrors the pair."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef_ds.config import Config, PairSynthConfig, SynthConfig
from albef_ds.data import TextTokenizer, clean_caption, eval_transform, swap_left_right
from albef_ds.data.datasets import ImageTextDataset
from albef_ds.data.nlvr import build_nlvr_train_loader, load_nlvr_records
from albef_ds.data.synth import COLOURS, SHAPES, SIZES
from albef_ds.data.synth_pairs import (
    NEUTRAL_PREDICATES,
    NLVR_TYPES,
    VE_TYPES,
    generate_synthetic_nlvr2,
    generate_synthetic_ta,
    generate_synthetic_ve,
    synthetic_nlvr2_ready,
    synthetic_ta_ready,
    synthetic_ve_ready,
)
from albef_ds.data.ve import load_ve_records

SPLITS = ("train", "val", "test")
SIZE = 48
COUNTS = {"one": 1, "two": 2, "three": 3}
SLOT_WORDS = {"on the left": "left", "in the middle": "middle", "on the right": "right"}
OBJECT_KEYS = {"shape", "colour", "size", "box"}
NOUN = r"(?:\w+ )?\w+"  # how a statement names an object: "circle", "red circle" or "red shape"


@pytest.fixture(scope="module")
def tiny_nlvr(tmp_path_factory: pytest.TempPathFactory) -> PairSynthConfig:
    # 24 train examples: two full blocks of the 6 kinds x true/false
    cfg = PairSynthConfig(
        out_dir=str(tmp_path_factory.mktemp("synth_nlvr2") / "set"),
        num_train=24,
        num_val=7,
        num_test=5,
        image_size=SIZE,
        seed=5,
    )
    generate_synthetic_nlvr2(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def tiny_ve(tmp_path_factory: pytest.TempPathFactory) -> PairSynthConfig:
    # 30 train examples: 10 per label, two full blocks of the 5 kinds for entailment and contradiction
    cfg = PairSynthConfig(
        out_dir=str(tmp_path_factory.mktemp("synth_ve") / "set"),
        num_train=30,
        num_val=7,
        num_test=4,
        image_size=SIZE,
        seed=5,
    )
    generate_synthetic_ve(cfg, progress=False)
    return cfg


def _load(cfg: PairSynthConfig) -> dict[str, list[dict]]:
    return {s: json.loads((Path(cfg.out_dir) / f"{s}.json").read_text()) for s in SPLITS}


# --------------------------------------------------------------------- labels, re-derived from the objects
def _slot(o: dict, size: int = SIZE) -> str:
    x0, _, x1, _ = o["box"]
    return ("left", "middle", "right")[min(2, int(3 * (x0 + x1) / 2 / size))]


def _find(objs: list[dict], noun: str) -> dict | None:
    """The object a statement names: "<shape>", "<colour> <shape>" or (refer_by colour) "<colour> shape"."""
    *colour, shape = noun.split()
    if shape == "shape" and not colour:
        return None
    return next((o for o in objs if shape in ("shape", o["shape"]) and colour in ([], [o["colour"]])), None)


def _has(objs: list[dict], thing: str) -> bool:
    """thing: "<shape>", "<colour> <shape>" or "<colour> shape"."""
    words = thing.split()
    if len(words) == 1:
        return _find(objs, words[0]) is not None
    colour, shape = words
    return any(o["colour"] == colour and shape in ("shape", o["shape"]) for o in objs)


def nlvr_truth(sentence: str, pair: list[list[dict]], size: int = SIZE) -> bool:
    """The truth of a (cleaned) synthetic NLVR2 statement about the pair's objects (left, right)."""
    img = {"left": pair[0], "right": pair[1]}
    other = {"left": "right", "right": "left"}
    side = r"(left|right)"
    where = "(on the left|in the middle|on the right)"
    rules = [
        (
            rf"^there (?:is|are) (one|two|three) shapes? in the {side} image$",
            lambda n, s: len(img[s]) == COUNTS[n],
        ),
        (rf"^the {side} image shows (one|two|three) shapes?$", lambda s, n: len(img[s]) == COUNTS[n]),
        (rf"^the {side} image (?:contains|shows) an? (\w+ \w+)$", lambda s, t: _has(img[s], t)),
        (rf"^there is an? (\w+ \w+) in the {side} image$", lambda t, s: _has(img[s], t)),
        (
            rf"^the {side} image has (more|fewer) shapes(?: than the {side} image)?$",
            lambda s, cmp, o=None: (
                (o in (None, other[s]))
                and (
                    (len(img[s]) > len(img[other[s]]))
                    if cmp == "more"
                    else (len(img[s]) < len(img[other[s]]))
                )
            ),
        ),
        (
            r"^(?:both images contain|there is) an? ([\w ]+?)(?: in both images)?$",
            lambda t: all(_has(v, t) for v in pair),
        ),
        (
            rf"^(?:the ({NOUN}) in the {side} image is|in the {side} image the ({NOUN}) is) (small|large)$",
            lambda a, s1, s2, b, z: (o := _find(img[s1 or s2], a or b)) is not None and o["size"] == z,
        ),
        (
            rf"^(?:the ({NOUN}) in the {side} image is|in the {side} image the ({NOUN}) is) {where}$",
            lambda a, s1, s2, b, w: (
                (o := _find(img[s1 or s2], a or b)) is not None and _slot(o, size) == SLOT_WORDS[w]
            ),
        ),
    ]
    for pattern, rule in rules:
        m = re.match(pattern, sentence)
        if m:
            return bool(rule(*m.groups()))
    raise AssertionError(f"no rule for {sentence!r}")


def ve_label(sentence: str, objs: list[dict], size: int = SIZE) -> str:
    """The label of a (cleaned) synthetic SNLI-VE hypothesis about the scene's objects."""
    for p in NEUTRAL_PREDICATES:
        if sentence.endswith(" " + p):
            subject = sentence[len("the ") : -len(p) - 1]
            assert _has(objs, subject), (sentence, objs)  # neutral statements are about present objects
            return "neutral"
    colours = "|".join(COLOURS)
    rules = [
        (r"^(?:there (?:is|are)|the image shows) (one|two|three) shapes?$", lambda n: len(objs) == COUNTS[n]),
        (r"^(?:there is|the image shows) an? (\w+ \w+)(?: in the image)?$", lambda t: _has(objs, t)),
        (
            rf"^(?:the shape in the middle|the middle shape) is ({colours})$",
            lambda c: any(_slot(o, size) == "middle" and o["colour"] == c for o in objs),
        ),
        (
            rf"^the (\w+)(?: in the image)? is ({colours})$",
            lambda s, c: (o := _find(objs, s)) is not None and o["colour"] == c,
        ),
        (
            rf"^the ({NOUN}) is (small|large)$",
            lambda s, z: (o := _find(objs, s)) is not None and o["size"] == z,
        ),
        (
            rf"^the ({NOUN}) is in the middle(?: of the image)?$",
            lambda s: _slot(_find(objs, s), size) == "middle",
        ),
        (
            rf"^the ({NOUN}) is between the ({NOUN}) and the ({NOUN})$",
            lambda s, a, b: (
                sorted([_slot(_find(objs, a)), _slot(_find(objs, b))]) == ["left", "right"]
                and _slot(_find(objs, s)) == "middle"
            ),
        ),
    ]
    for pattern, rule in rules:
        m = re.match(pattern, sentence)
        if m:
            return "entailment" if rule(*m.groups()) else "contradiction"
    raise AssertionError(f"no rule for {sentence!r}")


def _mirror(objs: list[dict], size: int = SIZE) -> list[dict]:
    out = []
    for o in objs:
        x0, y0, x1, y1 = o["box"]
        out.append({**o, "box": [size - x1, y0, size - x0, y1]})
    return out


# ------------------------------------------------------------------------------------------------ NLVR2
def test_nlvr_files_layout_and_loader_records(tiny_nlvr: PairSynthConfig) -> None:
    out = Path(tiny_nlvr.out_dir)
    for name in ("train.json", "val.json", "test.json", "DONE"):
        assert (out / name).is_file(), name
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # temp folder renamed away
    counts = {"train": 24, "val": 7, "test": 5}
    for split, records in _load(tiny_nlvr).items():
        assert len(records) == counts[split]
        assert [r["images"] for r in records] == [
            [f"images/{split}_{i:06d}_img{k}.jpg" for k in (0, 1)] for i in range(counts[split])
        ]
        for r in records:
            assert set(r) == {"images", "sentence", "label", "truth_type", "objects"}
            assert r["label"] in ("True", "False") and r["truth_type"] in NLVR_TYPES
            assert isinstance(r["sentence"], str) and r["sentence"].endswith(".")
            assert len(r["objects"]) == 2
            for objs in r["objects"]:
                assert 1 <= len(objs) <= 3
                assert len({o["shape"] for o in objs}) == len({o["colour"] for o in objs}) == len(objs)
                slots = [_slot(o) for o in objs]
                assert len(set(slots)) == len(slots) and slots == sorted(
                    slots, key=["left", "middle", "right"].index
                )
                for o in objs:
                    assert set(o) == OBJECT_KEYS
                    assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in SIZES
                    x0, y0, x1, y1 = o["box"]
                    assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        loaded = load_nlvr_records(out / f"{split}.json")  # the loader reads the layout
        assert [r["label"] for r in loaded] == [int(r["label"] == "True") for r in records]
        assert [r["type"] for r in loaded] == [r["truth_type"] for r in records]
    with Image.open(out / "images/val_000000_img1.jpg") as im:
        assert im.format == "JPEG" and im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_nlvr_balanced(tiny_nlvr: PairSynthConfig) -> None:
    for split, records in _load(tiny_nlvr).items():
        labels = Counter(r["label"] for r in records)
        assert abs(labels["True"] - labels["False"]) <= 1, (split, labels)
    train = _load(tiny_nlvr)["train"]
    per = Counter((r["truth_type"], r["label"]) for r in train)
    assert per == {(k, y): 2 for k in NLVR_TYPES for y in ("True", "False")}  # two full blocks


def test_nlvr_labels_agree_with_the_objects(tiny_nlvr: PairSynthConfig) -> None:
    n = 0
    for records in _load(tiny_nlvr).values():
        for r in records:
            sentence = clean_caption(r["sentence"], 30)
            assert nlvr_truth(sentence, r["objects"]) == (r["label"] == "True"), r
            n += 1
    assert n == 36


def test_objects_are_where_the_boxes_say(tiny_nlvr: PairSynthConfig, tiny_ve: PairSynthConfig) -> None:
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names], dtype=np.float64)  # [8, 3]
    checked = 0
    images = [(tiny_nlvr, r["images"][k], r["objects"][k]) for r in _load(tiny_nlvr)["val"] for k in (0, 1)]
    images += [(tiny_ve, r["image"], r["objects"]) for r in _load(tiny_ve)["val"]]
    for cfg, name, objs in images:
        with Image.open(Path(cfg.out_dir) / name) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)  # [H, W, 3]
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            rgb = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(axis=0)
            assert names[int(np.linalg.norm(palette - rgb, axis=1).argmin())] == o["colour"], (name, o)
            checked += 1
    assert checked >= 20


# ---------------------------------------------------------------------------------------------- SNLI-VE
def test_ve_files_layout_and_loader_records(tiny_ve: PairSynthConfig) -> None:
    out = Path(tiny_ve.out_dir)
    counts = {"train": 30, "val": 7, "test": 4}
    for split, records in _load(tiny_ve).items():
        assert [r["image"] for r in records] == [f"images/{split}_{i:06d}.jpg" for i in range(counts[split])]
        for r in records:
            assert set(r) == {"image", "sentence", "label", "hypothesis_type", "objects"}
            assert r["label"] in ("entailment", "neutral", "contradiction")
            assert (r["hypothesis_type"] == "neutral") == (r["label"] == "neutral")
            assert r["hypothesis_type"] in (*VE_TYPES, "neutral")
            assert 1 <= len(r["objects"]) <= 3 and all(set(o) == OBJECT_KEYS for o in r["objects"])
        loaded = load_ve_records(out / f"{split}.json")
        assert [r["label"] for r in loaded] == [
            {"contradiction": 0, "neutral": 1, "entailment": 2}[r["label"]] for r in records
        ]
        assert loaded[0]["image"] == str(out / records[0]["image"])


def test_ve_balanced_and_labels_agree_with_the_objects(tiny_ve: PairSynthConfig) -> None:
    data = _load(tiny_ve)
    for records in data.values():
        labels = Counter(r["label"] for r in records)
        assert (
            max(labels.values()) - min(labels.get(y, 0) for y in ("entailment", "neutral", "contradiction"))
            <= 1
        )
    per = Counter((r["hypothesis_type"], r["label"]) for r in data["train"])
    assert per == {
        ("neutral", "neutral"): 10,
        **{(k, y): 2 for k in VE_TYPES for y in ("entailment", "contradiction")},
    }
    for records in data.values():
        for r in records:
            assert ve_label(clean_caption(r["sentence"], 30), r["objects"]) == r["label"], r
    # Neutral predicates never appear in entailment or contradiction hypotheses.
    for r in data["train"]:
        if r["label"] != "neutral":
            assert not any(p in r["sentence"] for p in NEUTRAL_PREDICATES)


# --------------------------------------------------------------------------------------- both generators
@pytest.mark.parametrize("which", ["nlvr2", "ve"])
def test_ready_rerun_seeds_and_split_streams(
    which: str, tiny_nlvr: PairSynthConfig, tiny_ve: PairSynthConfig, tmp_path: Path
) -> None:
    cfg, gen, ready = {
        "nlvr2": (tiny_nlvr, generate_synthetic_nlvr2, synthetic_nlvr2_ready),
        "ve": (tiny_ve, generate_synthetic_ve, synthetic_ve_ready),
    }[which]
    out = Path(cfg.out_dir)
    assert ready(cfg) and not ready(dataclasses.replace(cfg, seed=6))
    assert not (synthetic_ve_ready if which == "nlvr2" else synthetic_nlvr2_ready)(cfg)  # the other kind
    done = (out / "DONE").stat().st_mtime_ns
    assert gen(cfg, progress=False) == out  # a no-op
    assert (out / "DONE").stat().st_mtime_ns == done
    # Same settings elsewhere: the same set; more training examples leave val and test as they are.
    again = dataclasses.replace(cfg, out_dir=str(tmp_path / "again"), num_train=cfg.num_train + 3)
    gen(again, progress=False)
    a, b = _load(cfg), _load(again)
    assert a["val"] == b["val"] and a["test"] == b["test"]
    assert b["train"][: cfg.num_train] == a["train"]  # the same stream, only longer
    img = next(p.name for p in (out / "images").iterdir() if p.name.startswith("val_"))
    assert (out / "images" / img).read_bytes() == (Path(again.out_dir) / "images" / img).read_bytes()
    other = dataclasses.replace(again, seed=6)
    gen(other, progress=False)  # replaces the stale set in place
    assert ready(other) and _load(other)["val"] != a["val"]


def test_a_selection_of_statement_kinds(tmp_path: Path) -> None:
    """synth.kinds: only the chosen kinds, each as often true as false (VE: entailment and contradiction
    of those kinds, neutral as before); labels still agree with the objects; unknown kinds refused."""
    cfg = PairSynthConfig(
        out_dir=str(tmp_path / "n"),
        num_train=8,
        num_val=0,
        num_test=0,
        image_size=32,
        kinds=["contains", "both"],
    )
    generate_synthetic_nlvr2(cfg, progress=False)
    train = _load(cfg)["train"]
    per = Counter((r["truth_type"], r["label"]) for r in train)
    assert per == {(k, y): 2 for k in ("contains", "both") for y in ("True", "False")}
    for r in train:
        assert nlvr_truth(clean_caption(r["sentence"], 30), r["objects"]) == (r["label"] == "True"), r
    ve = PairSynthConfig(out_dir=str(tmp_path / "v"), num_train=12, num_val=0, num_test=0, image_size=32)
    ve.kinds = ["exists", "colour"]
    generate_synthetic_ve(ve, progress=False)
    kinds = Counter((r["label"], r["hypothesis_type"]) for r in _load(ve)["train"])
    assert set(kinds) == {(y, k) for y in ("entailment", "contradiction") for k in ve.kinds} | {
        ("neutral", "neutral")
    }
    for gen in (generate_synthetic_nlvr2, generate_synthetic_ve):
        with pytest.raises(ValueError, match=r"synth.kinds \['nope'\] must be distinct kinds"):
            gen(PairSynthConfig(out_dir=str(tmp_path / "x"), kinds=["nope"]), progress=False)
    assert not (tmp_path / "x").exists()


def test_objects_named_by_colour(tmp_path: Path, small_synth: SynthConfig) -> None:
    """synth.refer_by=colour: every statement names objects by colour ("the red shape"), never a shape word,
    with every kind of both tasks drawn and every label still agreeing with the objects; any other value is
    refused."""
    tok = TextTokenizer.from_path(Path(small_synth.out_dir) / "vocab.txt", max_tokens=64)
    n = PairSynthConfig(out_dir=str(tmp_path / "n"), num_train=36, num_val=0, num_test=0, refer_by="colour")
    n.image_size = SIZE
    v = dataclasses.replace(n, out_dir=str(tmp_path / "v"), num_train=45)
    generate_synthetic_nlvr2(n, progress=False)
    generate_synthetic_ve(v, progress=False)
    nlvr, ve = _load(n)["train"], _load(v)["train"]
    assert {r["truth_type"] for r in nlvr} == set(NLVR_TYPES)
    assert {r["hypothesis_type"] for r in ve} == {*VE_TYPES, "neutral"}
    for r in nlvr:
        sentence = clean_caption(r["sentence"], 30)
        assert nlvr_truth(sentence, r["objects"]) == (r["label"] == "True"), r
    for r in ve:
        assert ve_label(clean_caption(r["sentence"], 30), r["objects"]) == r["label"], r
    texts = [clean_caption(r["sentence"], 30) for r in nlvr + ve]
    assert not [t for t in texts if set(SHAPES) & set(t.split())]
    assert sum(" shape " in f" {t} " for t in texts) > len(texts) / 2  # "a red shape", "the blue shape", ...
    for text, ids in zip(texts, tok.encode(texts)):
        assert tok.unk_token_id not in ids, text
    for gen in (generate_synthetic_nlvr2, generate_synthetic_ve):
        with pytest.raises(ValueError, match=r"synth.refer_by must be one of \['shape', 'colour'\]"):
            gen(PairSynthConfig(out_dir=str(tmp_path / "x"), refer_by="size"), progress=False)
    assert not (tmp_path / "x").exists()


def test_text_assignment_captions(tmp_path: Path, small_synth: SynthConfig) -> None:
    """synth-ta: NLVR2-style scenes with captions in the pre-training layout, each naming exactly the
    scene's colours (once each), its count when it states one, sizes only where true, no shape or side
    word, all in the debug vocabulary; the pre-training dataset reads the file."""
    cfg = PairSynthConfig(out_dir=str(tmp_path / "ta"), num_train=40, num_val=0, num_test=0, image_size=SIZE)
    assert generate_synthetic_ta(cfg, progress=False) == Path(cfg.out_dir) and synthetic_ta_ready(cfg)
    assert not synthetic_nlvr2_ready(cfg) and not synthetic_ta_ready(dataclasses.replace(cfg, seed=1))
    data = _load(cfg)
    assert (len(data["train"]), data["val"], data["test"]) == (40, [], [])
    tok = TextTokenizer.from_path(Path(small_synth.out_dir) / "vocab.txt", max_tokens=64)
    sizes = {len(r["objects"]) for r in data["train"]}
    assert sizes == {1, 2, 3}
    for i, r in enumerate(data["train"]):
        assert set(r) == {"image", "caption", "image_id", "objects"}
        assert r["image"] == f"images/train_{i:06d}.jpg" and r["image_id"] == f"train_{i:06d}"
        assert 1 <= len(r["caption"]) <= 3 and len(set(r["caption"])) == len(r["caption"])
        size_of = {o["colour"]: o["size"] for o in r["objects"]}
        for caption in r["caption"]:
            words = clean_caption(caption, 40).split()
            named = [w for w in words if w in COLOURS]
            assert sorted(named) == sorted(size_of), (caption, r["objects"])
            assert words.count("shape") + words.count("shapes") >= len(size_of)
            for k, w in enumerate(words):
                if w in SIZES:  # "a small red shape": the size of the object of that colour
                    assert size_of[words[k + 1]] == w, caption
                if w in COUNTS:
                    assert COUNTS[w] == len(size_of), caption
            assert not (set(SHAPES) | {"left", "right", "middle"}) & set(words), caption
            assert tok.unk_token_id not in tok.encode([" ".join(words)])[0], caption
    ds = ImageTextDataset(str(Path(cfg.out_dir) / "train.json"), transform=eval_transform(32), max_words=30)
    item = ds[0]
    assert len(ds) == 40 and item["image"].shape == (3, 32, 32)
    assert item["caption"] in [clean_caption(c, 30) for c in data["train"][0]["caption"]]


def test_refuses_foreign_folder_and_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for gen in (generate_synthetic_nlvr2, generate_synthetic_ve):
        with pytest.raises(FileExistsError, match="mine"):
            gen(PairSynthConfig(out_dir=str(tmp_path / "mine"), num_train=2), progress=False)
        with pytest.raises(ValueError, match="image_size >= 32"):
            gen(PairSynthConfig(out_dir=str(tmp_path / "x"), image_size=16), progress=False)
        with pytest.raises(ValueError, match="num_train >= 1"):
            gen(PairSynthConfig(out_dir=str(tmp_path / "x"), num_train=0), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious" and not (tmp_path / "x").exists()


def test_words_are_known_to_the_synthetic_vocab(
    tiny_nlvr: PairSynthConfig, tiny_ve: PairSynthConfig, small_synth: SynthConfig
) -> None:
    tok = TextTokenizer.from_path(Path(small_synth.out_dir) / "vocab.txt", max_tokens=64)
    texts = [
        clean_caption(r["sentence"], 30)
        for cfg in (tiny_nlvr, tiny_ve)
        for rs in _load(cfg).values()
        for r in rs
    ]
    texts += [swap_left_right(t) for t in texts]
    for text, ids in zip(texts, tok.encode(texts)):
        assert tok.unk_token_id not in ids, text
    # SNLI-VE names no side (its loader flips without touching the text).
    for rs in _load(tiny_ve).values():
        assert not any({"left", "right"} & set(clean_caption(r["sentence"], 30).split()) for r in rs)


# ------------------------------------------------------------------------- acceptance: the flip-swap
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_flip_swap_keeps_left_right_statements_true(
    tiny_nlvr: PairSynthConfig, small_synth: SynthConfig, loader: str
) -> None:
    """NLVR2 loader on the synthetic pairs, only resized (crop 1-1, no RandAugment) and flipped: every sample
    is either the pair as it is or its mirror (images swapped and mirrored); for a mirrored one the swapped
    sentence is still true of the swapped, mirrored objects, and it is the sentence the batch carries."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    out = Path(tiny_nlvr.out_dir)
    cfg = Config()
    cfg.model.vision.image_size = SIZE
    cfg.nlvr.train_file = [str(out / "train.json")]
    cfg.nlvr.flip_swap = True
    cfg.data.loader = loader
    cfg.data.num_workers = 0 if loader == "torch" else 2
    cfg.data.randaug_n = 0
    cfg.data.crop_scale = [1.0, 1.0]
    cfg.data.hflip = True
    tok = TextTokenizer.from_path(Path(small_synth.out_dir) / "vocab.txt", max_tokens=64)
    records = _load(tiny_nlvr)["train"]
    t = eval_transform(SIZE)
    views = []  # per record: [left, mirrored left, right, mirrored right] as the loader would normalise them
    for r in records:
        ims = [Image.open(out / p).convert("RGB") for p in r["images"]]
        views.append([t(v) for im in ims for v in (im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    loader_, sampler = build_nlvr_train_loader(cfg, tok, batch_size=8, seed=0)
    mirrored = kept = side_statements = 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for b in loader_:
            assert b["num_skipped"] == 0
            for q in range(b["index"].numel()):
                i = int(b["index"][q])
                r, v = records[i], views[i]
                d0 = [float((b["image0"][q] - x).abs().mean()) for x in v]
                d1 = [float((b["image1"][q] - x).abs().mean()) for x in v]
                got = (int(np.argmin(d0)), int(np.argmin(d1)))
                assert min(d0) < 0.05 and min(d1) < 0.05, (min(d0), min(d1))
                assert got in ((0, 2), (3, 1)), got  # as it is, or the mirror of the pair
                swapped = got == (3, 1)
                sentence = clean_caption(r["sentence"], 30)
                objects = r["objects"]
                if swapped:
                    sentence = swap_left_right(sentence)
                    objects = [_mirror(r["objects"][1]), _mirror(r["objects"][0])]
                    mirrored += 1
                    side_statements += r["truth_type"] == "position" and "in the middle" not in sentence
                assert nlvr_truth(sentence, objects) == (r["label"] == "True"), (sentence, r)
                n = int(b["attention_mask"][q].sum())
                assert b["input_ids"][q, :n].tolist() == tok.encode([sentence])[0]
                assert int(b["label"][q]) == int(r["label"] == "True")
                kept += 1
    assert kept == 72 and 0 < mirrored < kept
    assert side_statements > 0  # "in the left image the circle is on the left" met as a mirrored pair
