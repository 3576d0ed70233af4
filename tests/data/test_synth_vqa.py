"""synth_vqa.py: the generated VQA set (files, record layout, answers that agree with the pictures, balance,
determinism, safety, a vocabulary that covers its words)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef_ds.config import SynthConfig, VQASynthConfig
from albef_ds.data import TextTokenizer, clean_caption
from albef_ds.data.synth import COLOURS, SHAPES, SIZES
from albef_ds.data.synth_vqa import (
    COUNT_WORDS,
    QUESTION_TYPES,
    SLOTS,
    TRUE_ANSWERS,
    generate_synthetic_vqa,
    synthetic_vqa_ready,
)
from albef_ds.eval.vqa_metric import normalize_answer

SPLITS = ("train", "val", "test")
FIELDS = {"image", "question", "answer", "dataset", "question_id", "question_type", "truth", "objects"}


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory: pytest.TempPathFactory) -> VQASynthConfig:
    cfg = VQASynthConfig(
        out_dir=str(tmp_path_factory.mktemp("synth_vqa") / "set"),
        num_train=12,
        num_val=4,
        num_test=4,
        questions_per_image=3,
        image_size=48,
        seed=5,
    )
    generate_synthetic_vqa(cfg, progress=False)
    return cfg


def _load(cfg: VQASynthConfig) -> dict[str, list[dict]]:
    return {s: json.loads((Path(cfg.out_dir) / f"{s}.json").read_text()) for s in SPLITS}


def _named(question: str, words) -> str:
    found = [w for w in words if re.search(rf"\b{w}\b", question)]
    assert len(found) == 1, (question, found)
    return found[0]


def _slot(box: list[float], size: int) -> str:
    return SLOTS[min(2, int(3 * (box[0] + box[2]) / 2 / size))]  # the third of the image holding the centre


def test_files_and_record_layout(tiny_vqa: VQASynthConfig) -> None:
    out = Path(tiny_vqa.out_dir)
    for name in ("train.json", "val.json", "test.json", "answer_list.json", "DONE"):
        assert (out / name).is_file(), name
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # temp folder renamed away
    data = _load(tiny_vqa)
    counts = {"train": 12, "val": 4, "test": 4}
    qids = []
    for split, records in data.items():
        assert len(records) == counts[split] * 3
        assert sorted({r["image"] for r in records}) == [
            f"images/{split}_{i:06d}.jpg" for i in range(counts[split])
        ]
        for r in records:
            assert set(r) == {
                "image",
                "question",
                "answer",
                "dataset",
                "question_id",
                "question_type",
                "truth",
                "objects",
            }
            assert isinstance(r["question"], str) and r["question"].endswith("?")
            assert isinstance(r["answer"], list) and len(r["answer"]) == 10
            assert all(isinstance(a, str) and a for a in r["answer"])
            assert r["dataset"] == "vqa" and type(r["question_id"]) is int
            assert r["question_type"] in QUESTION_TYPES and r["truth"] in TRUE_ANSWERS[r["question_type"]]
            assert 1 <= len(r["objects"]) <= 3
            for o in r["objects"]:
                assert set(o) == {"shape", "colour", "size", "box"}
                assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in SIZES
                x0, y0, x1, y1 = o["box"]
                assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
            qids.append(r["question_id"])
    assert len(set(qids)) == len(qids)  # unique across the three splits
    with Image.open(out / data["val"][0]["image"]) as im:  # relative to the JSON's folder
        assert im.format == "JPEG" and im.size == (48, 48) and im.mode == "RGB"


def test_answers_agree_with_the_scene(tiny_vqa: VQASynthConfig) -> None:
    for records in _load(tiny_vqa).values():
        for r in records:
            objs, q, truth = r["objects"], r["question"], r["truth"]
            by_shape = {o["shape"]: o for o in objs}
            by_colour = {o["colour"]: o for o in objs}
            assert len(by_shape) == len(objs) == len(by_colour)  # shapes and colours unique per image
            slots = [_slot(o["box"], 48) for o in objs]
            assert len(set(slots)) == len(slots) and slots == sorted(slots, key=SLOTS.index)  # left to right
            kind = r["question_type"]
            if kind == "colour":
                assert by_shape[_named(q, SHAPES)]["colour"] == truth
            elif kind == "shape":
                assert by_colour[_named(q, COLOURS)]["shape"] == truth
            elif kind == "size":
                assert by_shape[_named(q, SHAPES)]["size"] == truth
            elif kind == "position":
                assert _slot(by_shape[_named(q, SHAPES)]["box"], 48) == truth
                if "left or the right" in q or "side" in q:
                    assert truth in ("left", "right")
            elif kind == "count":
                assert truth == COUNT_WORDS[len(objs) - 1]
            else:
                colour, shape = _named(q, COLOURS), _named(q, SHAPES)
                present = shape in by_shape and by_shape[shape]["colour"] == colour
                assert truth == ("yes" if present else "no")


def test_objects_are_where_the_boxes_say(tiny_vqa: VQASynthConfig) -> None:
    # The pixels at each box's centre have that object's colour (nearest named colour), so the boxes - and
    # through them the left/middle/right answers - match the pictures.
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names], dtype=np.float64)  # [8, 3]
    checked = 0
    for records in _load(tiny_vqa).values():
        for image in sorted({r["image"] for r in records}):
            objs = next(r["objects"] for r in records if r["image"] == image)
            with Image.open(Path(tiny_vqa.out_dir) / image) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.float64)  # [H, W, 3]
            for o in objs:
                x0, y0, x1, y1 = o["box"]
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                rgb = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(axis=0)
                assert names[int(np.linalg.norm(palette - rgb, axis=1).argmin())] == o["colour"], (image, o)
                checked += 1
    assert checked >= 20


def test_human_answers_and_answer_list(tiny_vqa: VQASynthConfig) -> None:
    data = _load(tiny_vqa)
    answer_list = json.loads((Path(tiny_vqa.out_dir) / "answer_list.json").read_text())
    assert answer_list == sorted(set(answer_list))
    assert set(answer_list) == {a for answers in TRUE_ANSWERS.values() for a in answers}
    unanimous = 0
    for records in data.values():
        for r in records:
            (first, n1), *rest = Counter(r["answer"]).most_common()
            assert first == r["truth"] and (not rest or rest[0][1] < n1)  # a strict majority for the truth
            (norm, m1), *norm_rest = Counter(normalize_answer(a) for a in r["answer"]).most_common()
            assert norm == normalize_answer(r["truth"]) and (not norm_rest or norm_rest[0][1] < m1)
            assert first in answer_list
            unanimous += n1 == 10
    n = sum(len(v) for v in data.values())
    assert 0 < unanimous < n  # disagreement is common but not universal


def test_question_types_balanced(tiny_vqa: VQASynthConfig) -> None:
    for records in _load(tiny_vqa).values():
        per_type = Counter(r["question_type"] for r in records)
        assert set(per_type) == set(QUESTION_TYPES)
        assert max(per_type.values()) - min(per_type.values()) <= 1
        yes_no = Counter(r["truth"] for r in records if r["question_type"] == "exists")
        assert abs(yes_no["yes"] - yes_no["no"]) <= 1
        for r in records:  # distinct types within an image (3 questions, blocks of 6)
            same_image = [x["question_type"] for x in records if x["image"] == r["image"]]
            assert len(set(same_image)) == len(same_image)


def test_ready_rerun_and_seeds(tiny_vqa: VQASynthConfig, tmp_path: Path) -> None:
    out = Path(tiny_vqa.out_dir)
    assert synthetic_vqa_ready(tiny_vqa)
    assert not synthetic_vqa_ready(dataclasses.replace(tiny_vqa, seed=6))
    assert not synthetic_vqa_ready(dataclasses.replace(tiny_vqa, questions_per_image=2))
    assert not synthetic_vqa_ready(VQASynthConfig(out_dir=str(tmp_path / "nothing")))
    done = (out / "DONE").stat().st_mtime_ns
    image = (out / "images/train_000000.jpg").stat().st_mtime_ns
    assert generate_synthetic_vqa(tiny_vqa, progress=False) == out  # a no-op: nothing rewritten
    assert (out / "DONE").stat().st_mtime_ns == done
    assert (out / "images/train_000000.jpg").stat().st_mtime_ns == image
    again = dataclasses.replace(tiny_vqa, out_dir=str(tmp_path / "again"))
    generate_synthetic_vqa(again, progress=False)
    assert _load(again) == _load(tiny_vqa)
    name = "images/test_000002.jpg"
    assert (out / name).read_bytes() == (Path(again.out_dir) / name).read_bytes()
    other = dataclasses.replace(again, seed=6)
    generate_synthetic_vqa(other, progress=False)  # replaces the stale set in place
    assert synthetic_vqa_ready(other) and not synthetic_vqa_ready(again)
    assert (out / name).read_bytes() != (Path(other.out_dir) / name).read_bytes()
    assert _load(other)["train"] != _load(tiny_vqa)["train"]


def test_refuses_foreign_folder_and_bad_settings(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="mine"):
        generate_synthetic_vqa(VQASynthConfig(out_dir=str(tmp_path / "mine"), num_train=2), progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(ValueError, match="image_size >= 32"):
        generate_synthetic_vqa(VQASynthConfig(out_dir=str(tmp_path / "x"), image_size=16), progress=False)
    assert not (tmp_path / "x").exists()


def test_words_are_known_to_the_synthetic_vocab(tiny_vqa: VQASynthConfig, small_synth: SynthConfig) -> None:
    # The debug models' WordPiece vocab is trained on synth's captions: every question and every candidate
    # answer must tokenise without [UNK] (no digits, no j/x/z in the vocabulary's alphabet).
    tok = TextTokenizer.from_path(Path(small_synth.out_dir) / "vocab.txt", max_tokens=64)
    answer_list = json.loads((Path(tiny_vqa.out_dir) / "answer_list.json").read_text())
    questions = [clean_caption(r["question"], 50) for records in _load(tiny_vqa).values() for r in records]
    for text, ids in zip(questions + answer_list, tok.encode(questions + answer_list)):
        assert tok.unk_token_id not in ids, text
    # Flip safety: "left" and "right" are the only horizontal words, and only in position questions.
    for records in _load(tiny_vqa).values():
        for r in records:
            words = set(clean_caption(r["question"], 50).split())
            assert not words & {"leftmost", "rightmost", "first", "last", "east", "west", "beside"}
            if words & {"left", "right"}:
                assert r["question_type"] == "position"
