"""synth.py: the generated synthetic image-text set (files, captions, determinism, safety)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from albef_ds.config import SynthConfig
from albef_ds.data import RetrievalEvalSet, generate_synthetic, load_annotations, synthetic_ready
from albef_ds.data.synth import (
    _PAIR_TEMPLATES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
)


def test_synthetic_files_and_captions(small_synth: SynthConfig) -> None:
    out = Path(small_synth.out_dir)
    for name in ("train.json", "eval.json", "vocab.txt", "DONE"):
        assert (out / name).is_file(), name
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # temp folder renamed away
    train = load_annotations(out / "train.json")
    held = load_annotations(out / "eval.json")
    assert len(train) == 64 and len(held) == 8
    assert (
        Path(train[0]["image"]).name == "train_000000.jpg"
        and Path(held[0]["image"]).name == "eval_000000.jpg"
    )
    with Image.open(train[5]["image"]) as im:
        assert im.format == "JPEG" and im.size == (48, 48) and im.mode == "RGB"
    assert all(len(e["caption"]) == 3 for e in train)
    assert all(2 <= len(e["caption"]) <= 3 for e in held)
    for e in train + held:
        caps = e["caption"]
        a = e["attributes"]
        assert a["shape"] in SHAPES and a["colour"] in COLOURS and a["size"] in SIZES
        assert a["position"] in POSITIONS
        for c in caps:  # every caption names colour and shape
            assert a["colour"] in c and a["shape"] in c
        text = " ".join(caps).lower()
        for word in ("left", "right"):  # flipped in training, so never named
            assert word not in text
    # Attributes vary across the set (a learnable, non-degenerate distribution).
    assert len({e["attributes"]["colour"] for e in train}) >= 6
    assert len({e["attributes"]["shape"] for e in train}) == 5
    # Vocab covers the caption words as whole pieces.
    vocab = (out / "vocab.txt").read_text().splitlines()
    assert len(vocab) == small_synth.vocab_size
    for w in ("circle", "purple", "checkered", "bottom", "middle"):
        assert w in vocab
    ev = RetrievalEvalSet(str(out / "eval.json"), image_size=32, max_words=30)
    assert ev.num_images == 8 and ev.num_texts == sum(len(e["caption"]) for e in held)


def test_synthetic_ready_and_deterministic(small_synth: SynthConfig, tmp_path: Path) -> None:
    assert synthetic_ready(small_synth)
    assert not synthetic_ready(dataclasses.replace(small_synth, seed=4))
    assert not synthetic_ready(dataclasses.replace(small_synth, num_train=65))
    assert not synthetic_ready(SynthConfig(out_dir=str(tmp_path / "nothing")))
    again = dataclasses.replace(small_synth, out_dir=str(tmp_path / "again"))
    generate_synthetic(again, progress=False)
    a = json.loads((Path(small_synth.out_dir) / "train.json").read_text())
    b = json.loads((Path(again.out_dir) / "train.json").read_text())
    assert a == b
    same = (Path(small_synth.out_dir) / "images/eval_000003.jpg").read_bytes()
    assert same == (Path(again.out_dir) / "images/eval_000003.jpg").read_bytes()
    other = dataclasses.replace(again, seed=4)
    generate_synthetic(other, progress=False)  # replaces the stale set in place
    assert synthetic_ready(other) and not synthetic_ready(again)
    assert json.loads((Path(other.out_dir) / "train.json").read_text()) != a


def test_synthetic_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="mine"):
        generate_synthetic(
            SynthConfig(out_dir=str(tmp_path / "mine"), num_train=2, num_eval=1), progress=False
        )
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def _pair_fillings(objs: list[dict]) -> set[str]:
    out = set()
    for a, b in (objs, objs[::-1]):
        f = {"c1": a["colour"], "s1": a["size"], "c2": b["colour"], "s2": b["size"]}
        f |= {"a1": "an" if a["size"][0] in "aeiou" else "a", "a2": "an" if b["size"][0] in "aeiou" else "a"}
        out |= {t.format(**f) for t in _PAIR_TEMPLATES}
    return out


def test_two_object_set_names_both_colours_with_their_sizes(tmp_path: Path) -> None:
    """`synth.objects=2`: two objects of distinct colours drawn where the record says, every caption naming
    both colours with the right size and no other attribute; the vocabulary keeps the one-object words."""
    cfg = SynthConfig(out_dir=str(tmp_path / "two"), num_train=40, num_eval=10, image_size=80, objects=2)
    out = generate_synthetic(cfg, progress=False)
    train = load_annotations(out / "train.json")
    held = load_annotations(out / "eval.json")
    assert len(train) == 40 and len(held) == 10
    unnamed = set(SHAPES) | set(BACKGROUNDS) | set(TEXTURES) | set(POSITIONS) | {"left", "right"}
    sizes_seen = set()
    for e in train + held:
        objs = e["attributes"]["objects"]
        assert len(objs) == 2 and objs[0]["colour"] != objs[1]["colour"]
        assert {o["position"] for o in objs} == {"top", "bottom"}
        with Image.open(e["image"]) as im:
            rgb = im.convert("RGB")
            for o in objs:  # the object's colour at its box centre, within the fill jitter + JPEG error
                x0, y0, x1, y1 = o["box"]
                px = rgb.getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2)))
                assert max(abs(p - q) for p, q in zip(px, COLOURS[o["colour"]])) <= 40, (o, px)
            small, large = (o for o in sorted(objs, key=lambda o: o["box"][2] - o["box"][0]))
            if small["size"] != large["size"]:
                assert (small["size"], large["size"]) == ("small", "large")
        for c in e["caption"]:
            words = c.lower().replace("(", " ").replace(")", " ").replace(",", " ").replace(".", " ").split()
            assert not unnamed & set(words), c
            # each colour with its own size: the caption is one of the templates filled in either order
            assert c in _pair_fillings(objs), (c, objs)
            sizes_seen.add(tuple(sorted(o["size"] for o in objs)))
    assert len(sizes_seen) == 3  # small+small, large+small, large+large all occur
    vocab = (out / "vocab.txt").read_text().splitlines()
    for w in ("circle", "checkered", "teal", "bottom", "large", "purple"):
        assert w in vocab
    with pytest.raises(ValueError, match="synth.objects must be 1 or 2"):
        generate_synthetic(dataclasses.replace(cfg, out_dir=str(tmp_path / "three"), objects=3))
