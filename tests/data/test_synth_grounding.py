"""synth_grounding.py: the generated grounding set (layouts read by `grounding`'s readers, unique referents
re-derived from the text, boxes where the objects are drawn, proposals, splits, reuse and seed streams,
the vocabulary's alphabet)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef_ds.config import GroundingSynthConfig, SynthConfig
from albef_ds.data import TextTokenizer, clean_caption, swap_left_right
from albef_ds.data.grounding import (
    GroundingEvalSet,
    load_grounding_eval,
    load_grounding_train,
    load_proposals,
    load_refs,
    write_retrieval_train,
)
from albef_ds.data.synth import COLOURS, SHAPES, SIZES
from albef_ds.data.synth_grounding import (
    ATTRIBUTES,
    WORDS,
    generate_synthetic_grounding,
    synthetic_grounding_ready,
)

SIZE = 48
FILES = ("train", "val", "test")
_WHERE = {"on the left": "left", "in the middle": "middle", "on the right": "right"}
_EXPRESSION = re.compile(
    rf"^(?:the )?(?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOURS)}) )?({'|'.join(SHAPES)}|shape|one)"
    rf"(?: ({'|'.join(_WHERE)}))?$"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> GroundingSynthConfig:
    cfg = GroundingSynthConfig(
        out_dir=str(tmp_path_factory.mktemp("synth_grounding") / "set"),
        num_train_images=30,
        num_val_images=8,
        num_test_images=9,
        image_size=SIZE,
        num_proposals=8,
        seed=4,
    )
    generate_synthetic_grounding(cfg, progress=False)
    return cfg


def _load(cfg: GroundingSynthConfig) -> dict[str, list[dict]]:
    return {f: json.loads((Path(cfg.out_dir) / f"{f}.json").read_text()) for f in FILES}


def _named(text: str) -> dict[str, str]:
    """The attributes a (cleaned) synthetic expression names, parsed from its words alone."""
    m = _EXPRESSION.match(text)
    assert m, text
    size, colour, noun, where = m.groups()
    named = {
        "size": size,
        "colour": colour,
        "shape": noun if noun in SHAPES else None,
        "slot": _WHERE.get(where),
    }
    return {k: v for k, v in named.items() if v is not None}


def test_layout_splits_and_readers(tiny: GroundingSynthConfig) -> None:
    out = Path(tiny.out_dir)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["images", "train.json", "val.json", "test.json", "refs.json", "proposals.json", "DONE"]
    )
    data = _load(tiny)
    refs = load_refs(out / "refs.json")
    props = load_proposals(out / "proposals.json")
    assert len(refs.images) == len(props.boxes) == 30 + 8 + 9
    per_split = Counter(r.split for r in refs.refs.values())
    assert set(per_split) == {"train", "val", "testA", "testB"}
    # refs_per_image 2, expressions_per_ref 2: every scene has >= 2 objects, each referable (position words)
    assert per_split == {"train": 60, "val": 16, "testA": 10, "testB": 8}
    assert {len(data[f]) for f in FILES} == {120, 32, 36}
    for f, records in data.items():
        for r in records:
            assert set(r) == {"image", "text", "ref_id", "attributes", "target", "objects"}
            assert isinstance(r["ref_id"], int) and refs.refs[str(r["ref_id"])].box == tuple(
                r["objects"][r["target"]]["box"]
            )
            split = refs.refs[str(r["ref_id"])].split
            assert {"train": ("train",), "val": ("val",), "test": ("testA", "testB")}[f].count(split) == 1
            assert len(r["objects"]) == {"testA": 3, "testB": 2}.get(split, len(r["objects"])) >= 2
    assert [refs.refs[str(r["ref_id"])].split for r in data["test"]] == ["testA"] * 20 + ["testB"] * 16
    # the readers of the real files
    assert len(load_grounding_train(out / "train.json")) == 120
    assert load_grounding_eval(out / "val.json")[0]["image"] == str(out / data["val"][0]["image"])
    ev = GroundingEvalSet(out / "test.json", refs=refs, proposals=props, image_size=32, max_words=30)
    assert ev.split_names == ("testA", "testB") and ev.sizes[0] == (SIZE, SIZE) and len(ev) == 36
    info = write_retrieval_train([out / "train.json"], out.parent / "retrieval.json")
    assert info["images"] == 30 and info["entries"] == 120
    with Image.open(out / data["val"][0]["image"]) as im:
        assert im.format == "JPEG" and im.size == (SIZE, SIZE)
    ids = [int(k) for k in refs.images]
    assert len(set(ids)) == len(ids)


def test_expressions_single_out_their_referent(tiny: GroundingSynthConfig) -> None:
    kinds = Counter()
    for records in _load(tiny).values():
        for r in records:
            named = _named(clean_caption(r["text"], 30))
            assert sorted(named) == sorted(r["attributes"]), r
            matching = [k for k, o in enumerate(r["objects"]) if all(o[a] == v for a, v in named.items())]
            assert matching == [r["target"]], (r["text"], r["objects"])
            kinds[tuple(sorted(named))] += 1
    assert len(kinds) >= 8  # many kinds of description, ...
    assert sum(n for k, n in kinds.items() if "slot" not in k) > 30  # ... many without a position
    assert sum(n for k, n in kinds.items() if len(k) >= 3) > 0  # ... some over-specified
    # repeated shapes / colours: some scenes need more than one word to tell the referent apart
    assert any(len({o["shape"] for o in r["objects"]}) < len(r["objects"]) for r in _load(tiny)["train"])


def test_boxes_hold_the_drawn_objects(tiny: GroundingSynthConfig) -> None:
    """Pixels of an object's colour in its third of the image lie inside its box (1.5 px of slack), fill a
    good part of it and reach every side of it."""
    out = Path(tiny.out_dir)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres
    checked = 0
    for r in _load(tiny)["val"] + _load(tiny)["test"]:
        with Image.open(out / r["image"]) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)  # [H, W, 3]
        for o in r["objects"]:
            k = ("left", "middle", "right").index(o["slot"])
            mask = np.linalg.norm(pixels - np.array(COLOURS[o["colour"]]), axis=2) < 50
            mask &= (xx >= k * SIZE / 3) & (xx <= (k + 1) * SIZE / 3)
            x, y, w, h = o["box"]
            near = (xx >= x - 1.5) & (xx <= x + w + 1.5) & (yy >= y - 1.5) & (yy <= y + h + 1.5)
            inside = (xx >= x) & (xx <= x + w) & (yy >= y) & (yy <= y + h)
            assert mask.sum() > 0 and (mask & near).sum() >= 0.98 * mask.sum(), (r["image"], o)
            assert (mask & inside).sum() >= 0.2 * inside.sum(), (r["image"], o)
            assert abs(xx[mask].min() - x) < 2.5 and abs(xx[mask].max() - (x + w)) < 2.5, (r["image"], o)
            assert abs(yy[mask].min() - y) < 2.5 and abs(yy[mask].max() - (y + h)) < 2.5, (r["image"], o)
            checked += 1
    assert checked >= 30


def test_proposals_hold_every_object_box(tiny: GroundingSynthConfig) -> None:
    out = Path(tiny.out_dir)
    refs, props = load_refs(out / "refs.json"), load_proposals(out / "proposals.json")
    for ref in refs.refs.values():
        assert ref.box in props.boxes[ref.image_id]
    for records in _load(tiny).values():
        for r in records:
            image_id = refs.refs[str(r["ref_id"])].image_id
            boxes = props.boxes[image_id]
            assert len(boxes) == 8
            assert all(tuple(o["box"]) in boxes for o in r["objects"])  # distractors' boxes too
            for x, y, w, h in boxes:
                assert (
                    0 <= x and 0 <= y and x + w <= SIZE + 1e-6 and y + h <= SIZE + 1e-6 and w >= 2 and h >= 2
                )
    first = next(iter(props.boxes.values()))
    assert len(set(first)) == len(first)  # jittered copies differ from the boxes they copy


def test_reuse_seeds_and_split_streams(tiny: GroundingSynthConfig, tmp_path: Path) -> None:
    out = Path(tiny.out_dir)
    assert synthetic_grounding_ready(tiny) and not synthetic_grounding_ready(
        dataclasses.replace(tiny, seed=5)
    )
    done = (out / "DONE").stat().st_mtime_ns
    assert generate_synthetic_grounding(tiny, progress=False) == out  # a no-op
    assert (out / "DONE").stat().st_mtime_ns == done
    again = dataclasses.replace(tiny, out_dir=str(tmp_path / "again"), num_train_images=33)
    generate_synthetic_grounding(again, progress=False)
    a, b = _load(tiny), _load(again)
    assert a["val"] == b["val"] and a["test"] == b["test"]
    assert b["train"][: len(a["train"])] == a["train"]
    name = a["val"][0]["image"]
    assert (out / name).read_bytes() == (Path(again.out_dir) / name).read_bytes()
    other = dataclasses.replace(again, seed=5)
    generate_synthetic_grounding(other, progress=False)  # replaces the stale set in place
    assert synthetic_grounding_ready(other) and _load(other)["val"] != a["val"]


@pytest.mark.parametrize("shape_words", [True, False])
def test_without_position_words(tmp_path: Path, shape_words: bool) -> None:
    cfg = GroundingSynthConfig(
        out_dir=str(tmp_path / "set"),
        num_train_images=20,
        num_val_images=0,
        num_test_images=0,
        image_size=SIZE,
        position_words=False,
        shape_words=shape_words,
    )
    generate_synthetic_grounding(cfg, progress=False)
    records = _load(cfg)["train"]
    assert records and json.loads((tmp_path / "set" / "val.json").read_text()) == []
    for r in records:
        text = clean_caption(r["text"], 30)
        assert not {"left", "middle", "right"} & set(text.split()) and "slot" not in r["attributes"]
        if not shape_words:  # colour and size only: no shape word, and the head noun is "shape" / "one"
            assert set(r["attributes"]) <= {"size", "colour"}, r
            assert not set(SHAPES) & set(text.split()), text
        named = _named(text)
        assert [k for k, o in enumerate(r["objects"]) if all(o[a] == v for a, v in named.items())] == [
            r["target"]
        ]


def test_refuses_foreign_folder_and_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="mine"):
        generate_synthetic_grounding(GroundingSynthConfig(out_dir=str(tmp_path / "mine")), progress=False)
    x = str(tmp_path / "x")
    for bad, match in [
        ({"num_train_images": 0}, "1 <= num_train_images"),
        ({"num_val_images": -1}, "1 <= num_train_images"),
        ({"refs_per_image": 4}, "refs_per_image in 1..3"),
        ({"expressions_per_ref": 0}, "expressions_per_ref >= 1"),
        ({"num_proposals": 2}, "num_proposals >= 3"),
        ({"image_size": 16}, "image_size >= 32"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate_synthetic_grounding(GroundingSynthConfig(out_dir=x, **bad), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious" and not (tmp_path / "x").exists()


def test_words_are_known_to_the_synthetic_vocab(tiny: GroundingSynthConfig, small_synth: SynthConfig) -> None:
    tok = TextTokenizer.from_path(Path(small_synth.out_dir) / "vocab.txt", max_tokens=64)
    texts = sorted(WORDS) + [clean_caption(r["text"], 30) for rs in _load(tiny).values() for r in rs]
    texts += [swap_left_right(t) for t in texts]
    for text, ids in zip(texts, tok.encode(texts)):
        assert tok.unk_token_id not in ids, text
    assert {w for t in texts for w in t.split()} <= WORDS
    assert set(ATTRIBUTES) == {"size", "colour", "shape", "slot"}
