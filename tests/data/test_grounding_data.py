"""grounding.py: the ALBEF grounding files, refs.json / proposals.json (errors naming file, entry and field),
the evaluation set's cross-checks and the training set through the unchanged retrieval loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from albef_ds.config import Config
from albef_ds.data import TextTokenizer
from albef_ds.data.grounding import (
    GroundingEvalSet,
    build_grounding_train_loader,
    check_box,
    load_grounding_eval,
    load_grounding_train,
    load_proposals,
    load_refs,
    write_retrieval_train,
)
from albef_ds.data.karpathy import check_karpathy_train

SIZES = {1: (40, 30), 2: (32, 32)}  # image_id -> (width, height)


def _dump(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def ground(tmp_path: Path) -> Path:
    """Two COCO-like images, three refs, an ALBEF test file, refs.json and proposals.json."""
    (tmp_path / "img").mkdir()
    for i, (w, h) in SIZES.items():
        Image.new("RGB", (w, h), (i * 60, 90, 30)).save(tmp_path / "img" / f"COCO_{i:03d}.jpg")
    _dump(
        tmp_path / "test.json",
        [
            {"image": "img/COCO_001.jpg", "text": "The man, on the LEFT!", "ref_id": 7},
            {"image": "img/COCO_001.jpg", "text": "left guy", "ref_id": 7},
            {"image": "img/COCO_001.jpg", "text": "red car", "ref_id": "8"},
            {"image": "img/COCO_002.jpg", "text": "a dog", "ref_id": 10},
        ],
    )
    _dump(
        tmp_path / "refs.json",
        {
            "refs": {
                "7": {"image_id": 1, "split": "testA", "box": [1, 2, 10, 20]},
                "8": {"image_id": 1, "split": "testB", "box": [20.5, 2, 10, 5.5]},
                "10": {"image_id": "2", "split": "val", "box": [0, 0, 32, 32], "sentences": ["ignored"]},
            },
            "images": {
                "1": {"width": 40, "height": 30, "file_name": "COCO_001.jpg"},
                "2": {"width": 32, "height": 32},
            },
        },
    )
    _dump(tmp_path / "proposals.json", {"1": [[1, 2, 10, 20, 0.9], [20, 2, 10, 5]], "2": []})
    return tmp_path


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    _dump(path, data)


def test_eval_set_items(ground: Path) -> None:
    ev = GroundingEvalSet(
        ground / "test.json",
        refs=ground / "refs.json",
        proposals=ground / "proposals.json",
        image_size=16,
        max_words=3,
    )
    assert len(ev) == 4
    assert ev.texts == ["the man on", "left guy", "red car", "a dog"]  # clean_caption, max_words
    assert ev.ref_ids == [7, 7, "8", 10]
    assert ev.splits == ["testA", "testA", "testB", "val"] and ev.split_names == ("val", "testA", "testB")
    assert ev.boxes[2] == (20.5, 2.0, 10.0, 5.5) and ev.boxes[3] == (0.0, 0.0, 32.0, 32.0)
    assert ev.proposals[0] == [(1.0, 2.0, 10.0, 20.0), (20.0, 2.0, 10.0, 5.0)] and ev.proposals[3] == []
    assert ev.sizes == [(40, 30)] * 3 + [(32, 32)]
    assert ev.image_ids == ["1", "1", "1", "2"]
    assert ev.images[0] == str(ground / "img" / "COCO_001.jpg")
    batches = list(ev.image_batches(0, 4, batch_size=3))
    assert [b[0].shape for b in batches] == [torch.Size([3, 3, 16, 16]), torch.Size([1, 3, 16, 16])]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 2, 3]
    # image_root instead of the JSON's folder; loaded refs / proposals can be shared between val and test
    moved = _dump(ground / "img" / "t.json", json.loads((ground / "test.json").read_text()))
    refs, props = load_refs(ground / "refs.json"), load_proposals(ground / "proposals.json")
    again = GroundingEvalSet(
        moved, refs=refs, proposals=props, image_root=str(ground), image_size=16, max_words=30
    )
    assert again.images == ev.images and again.boxes == ev.boxes


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda d: d.append({"image": "img/COCO_002.jpg", "text": "x", "ref_id": 99}),
            r"entry 4: ref_id 99 has no entry in refs file",
        ),
        (
            lambda d: d[0].update(image="img/COCO_002.jpg"),
            r"entry 0: field 'image' .* is not the image of ref 7: .* 'COCO_001.jpg'",
        ),
        (lambda d: d[1].pop("ref_id"), r"test.json: entry 1 has no field 'ref_id'"),
        (lambda d: d[1].update(ref_id=True), r"entry 1: field 'ref_id' must be an int or a non-empty str"),
        (lambda d: d[2].update(text=None), r"entry 2: field 'text' must be a str"),
        (lambda d: d[3].update(image=""), r"entry 3: field 'image' must be a non-empty str"),
    ],
)
def test_eval_records_checked(ground: Path, edit, match: str) -> None:
    _edit(ground / "test.json", edit)
    with pytest.raises(ValueError, match=match):
        GroundingEvalSet(
            ground / "test.json",
            refs=ground / "refs.json",
            proposals=ground / "proposals.json",
            image_size=16,
            max_words=30,
        )


def test_eval_set_cross_checks(ground: Path) -> None:
    def build():
        return GroundingEvalSet(
            ground / "test.json",
            refs=ground / "refs.json",
            proposals=ground / "proposals.json",
            image_size=16,
            max_words=30,
        )

    _edit(ground / "proposals.json", lambda d: d.pop("2"))  # an image id missing (not an empty list)
    with pytest.raises(
        ValueError,
        match=r"proposals file .*proposals.json has no entry for image_id '2' .*COCO_002.jpg.* entry 3",
    ):
        build()
    _edit(ground / "proposals.json", lambda d: d.update({"2": []}))
    _edit(ground / "refs.json", lambda d: d["images"]["2"].update(width=33))
    with pytest.raises(ValueError, match=r"COCO_002.jpg is 32x32 pixels but refs file .* gives 33x32"):
        build()
    _edit(ground / "refs.json", lambda d: d["images"]["2"].update(width=32))
    (ground / "img" / "COCO_002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) missing"):
        build()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("images"), r"refs.json has no field 'images'"),
        (lambda d: d.update(refs=[]), r"refs.json: field 'refs' must be a JSON object"),
        (lambda d: d["refs"]["7"].pop("box"), r"ref '7' has no field 'box'"),
        (
            lambda d: d["refs"]["7"].update(box=[1, 2, 3]),
            r"ref '7': field 'box' must be a box \[x, y, w, h\] of 4",
        ),
        (
            lambda d: d["refs"]["7"].update(box=[1, 2, 3, float("nan")]),
            r"ref '7': field 'box': box .* finite",
        ),
        (lambda d: d["refs"]["7"].update(box=[1, 2, -3, 4]), r"ref '7': field 'box': box .* width -3"),
        (
            lambda d: d["refs"]["7"].update(box=[1, 2, True, 4]),
            r"ref '7': field 'box': box .* finite numbers",
        ),
        (lambda d: d["refs"]["7"].update(split="dev"), r"ref '7': field 'split' must be one of"),
        (
            lambda d: d["refs"]["7"].update(image_id=3),
            r"ref '7': image_id 3 has no entry in the file's 'images'",
        ),
        (lambda d: d["refs"]["7"].update(image_id=None), r"ref '7': field 'image_id' must be an int"),
        (lambda d: d["images"]["1"].update(height=0), r"image '1': field 'height' must be a positive int"),
        (lambda d: d["images"]["1"].update(width=40.0), r"image '1': field 'width' must be a positive int"),
        (
            lambda d: d["images"]["1"].update(file_name=""),
            r"image '1': field 'file_name' must be a non-empty str",
        ),
    ],
)
def test_refs_checked(ground: Path, edit, match: str) -> None:
    _edit(ground / "refs.json", edit)
    with pytest.raises(ValueError, match=match):
        load_refs(ground / "refs.json")


def test_proposals_and_files_checked(ground: Path) -> None:
    p = ground / "proposals.json"
    for data, match in [
        ([[1, 2, 3, 4]], r"proposals.json must be a JSON object"),
        ({"1": [[1, 2, 3, 4]], "2": None}, r"image '2' must map to a list of boxes"),
        ({"1": [[1, 2, 3, 4], [1, 2, 0, 4]]}, r"image '1', box 1: box .* width 0"),
        ({"1": [[1, 2, 3, "4"]]}, r"image '1', box 0: box .* finite numbers"),
    ]:
        _dump(p, data)
        with pytest.raises(ValueError, match=match):
            load_proposals(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="proposals file .* is not valid JSON"):
        load_proposals(p)
    with pytest.raises(FileNotFoundError, match="refs file .* does not exist"):
        load_refs(ground / "nope.json")
    assert check_box((0, 0, 1e-3, 5), "b") == (0.0, 0.0, 0.001, 5.0)


def test_train_reader_and_retrieval_layout(ground: Path) -> None:
    train = _dump(
        ground / "train.json",
        [
            {"image": "img/COCO_001.jpg", "text": "man on the left"},
            {"image": "img/COCO_002.jpg", "text": "dog"},
            {"image": "img/COCO_001.jpg", "text": "red car", "ref_id": 8},  # extra fields are ignored
        ],
    )
    assert load_grounding_train(train)[2] == {
        "image": str(ground / "img" / "COCO_001.jpg"),
        "text": "red car",
    }
    assert load_grounding_eval(ground / "test.json")[2]["ref_id"] == "8"
    other = _dump(
        ground / "train2.json", [{"image": str(ground / "img" / "COCO_002.jpg"), "text": "a small dog"}]
    )
    info = write_retrieval_train([train, other], ground / "run" / "r.json")
    assert info == {"file": str(ground / "run" / "r.json"), "entries": 4, "images": 2}
    rows = json.loads((ground / "run" / "r.json").read_text())
    assert [r["image_id"] for r in rows] == ["COCO_001.jpg", "COCO_002.jpg", "COCO_001.jpg", "COCO_002.jpg"]
    assert [r["caption"] for r in rows] == ["man on the left", "dog", "red car", "a small dog"]
    assert all(Path(r["image"]).is_absolute() for r in rows)
    check_karpathy_train(ground / "run" / "r.json")  # the retrieval train layout
    _dump(train, [{"image": "img/COCO_001.jpg", "caption": "man"}])
    with pytest.raises(ValueError, match=r"grounding train file .*train.json: entry 0 has no field 'text'"):
        load_grounding_train(train)
    _dump(train, [])
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load_grounding_train(train)
    with pytest.raises(ValueError, match="grounding.train_file is empty"):
        write_retrieval_train([], ground / "x.json")


def test_train_loader_gives_one_idx_per_image(ground: Path, vocab_file: Path) -> None:
    """Every expression of an image is a positive: the retrieval loader's "idx" is one number per image."""
    texts = ["man on the left", "dog", "red car", "a dog", "the car", "big red circle"]
    images = ["img/COCO_001.jpg", "img/COCO_002.jpg"]
    _dump(ground / "train.json", [{"image": images[k % 2], "text": t} for k, t in enumerate(texts)])
    cfg = Config()
    cfg.model.vision.image_size = 16
    cfg.grounding.train_file = [str(ground / "train.json")]
    cfg.data.num_workers = 0
    cfg.data.randaug_n = 0
    tok = TextTokenizer.from_path(vocab_file, max_tokens=16)
    loader, sampler = build_grounding_train_loader(cfg, tok, work_dir=ground / "run", batch_size=3, seed=0)
    assert (ground / "run" / "grounding_train_retrieval.json").is_file()
    sampler.set_epoch(0)
    seen = {}
    for b in loader:
        assert b["image"].shape[1:] == (3, 16, 16) and b["input_ids"].shape[0] == 3
        for i, idx in zip(b["index"].tolist(), b["idx"].tolist()):
            seen[i] = idx
    assert len(seen) == 6
    assert {seen[i] for i in (0, 2, 4)} == {0} and {seen[i] for i in (1, 3, 5)} == {1}
    assert cfg.finetune.train_file == []  # the caller's config is left as it was
