from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.data import (
    ImageTextCollator,
    ImageTextDataset,
    RetrievalEvalSet,
    ShardedEpochSampler,
    TextTokenizer,
    eval_transform,
    load_annotations,
)


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _noise_image(size: int = 40, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------ annotations
def test_load_annotations_resolves_paths(tmp_path: Path) -> None:
    ann = _write_json(
        tmp_path / "a.json",
        [
            {"image": "img/x.jpg", "caption": "one"},
            {"image": "/abs/y.jpg", "caption": ["a", "b"], "image_id": 7},
        ],
    )
    out = load_annotations(ann)
    assert out[0]["image"] == str(tmp_path / "img" / "x.jpg")
    assert out[1]["image"] == "/abs/y.jpg" and out[1]["caption"] == ["a", "b"] and out[1]["image_id"] == 7
    root = tmp_path / "root"
    assert load_annotations(ann, str(root))[0]["image"] == str(root / "img" / "x.jpg")


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("not json [", "not valid JSON"),
        ('{"image": "a"}', "JSON list"),
        ('[{"image": "a", "caption": "c"}, 3]', "entry 1 must be an object"),
        ('[{"caption": "c"}]', "entry 0 has no field 'image'"),
        ('[{"image": "a.jpg"}]', "entry 0 has no field 'caption'"),
        ('[{"image": "a.jpg", "caption": 5}]', "entry 0: field 'caption' must be a str or a list of str"),
        ('[{"image": "a.jpg", "caption": ["ok", 5]}]', "entry 0: field 'caption'.*item 1"),
        ('[{"image": "a.jpg", "caption": "c"}, {"image": "b.jpg", "caption": []}]', "entry 1: .*empty list"),
        ('[{"image": 3, "caption": "c"}]', "entry 0: field 'image'"),
    ],
)
def test_load_annotations_errors_name_file_and_entry(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "bad_ann.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=pattern) as info:
        load_annotations(path)
    assert str(path) in str(info.value)


def test_load_annotations_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_annotations(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------- decoding and skipping
@pytest.fixture()
def mixed_images(tmp_path: Path) -> tuple[Path, dict[str, bool]]:
    """Annotation file over good and broken images; returns (json, {name: decodable})."""
    d = tmp_path / "imgs"
    d.mkdir()
    _noise_image().save(d / "rgb.jpg", quality=90)
    _noise_image().convert("L").save(d / "gray.jpg")
    _noise_image().convert("CMYK").save(d / "cmyk.jpg")
    _noise_image().convert("RGBA").save(d / "rgba.png")
    _noise_image().convert("P").save(d / "palette.png")
    (d / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    _noise_image(64).save(buf, format="JPEG", quality=95)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.jpg").write_text("this is not an image\n")
    names = {
        "rgb.jpg": True,
        "gray.jpg": True,
        "cmyk.jpg": True,
        "rgba.png": True,
        "palette.png": True,
        "empty.jpg": False,
        "truncated.jpg": False,
        "text.jpg": False,
        "absent.jpg": False,
    }
    ann = _write_json(
        tmp_path / "ann.json", [{"image": f"imgs/{n}", "caption": f"Image: {n}!"} for n in names]
    )
    return ann, names


def test_dataset_decodes_modes_and_skips_broken(
    mixed_images: tuple[Path, dict[str, bool]], vocab_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ann, names = mixed_images
    ds = ImageTextDataset([str(ann)], transform=eval_transform(16), max_words=30)
    assert len(ds) == len(names)
    samples = []
    with caplog.at_level(logging.WARNING):
        for i, (name, ok) in enumerate(names.items()):
            s = ds[i]
            samples.append(s)
            if ok:
                assert s is not None, name
                assert s["image"].shape == (3, 16, 16) and s["index"] == i
                assert s["caption"] == "image " + name.replace(".", "")  # cleaned: no ":", "!", "."
            else:
                assert s is None, name
                assert name in caplog.text
    coll = ImageTextCollator(TextTokenizer.from_path(vocab_file, max_tokens=8))
    batch = coll(samples)
    n_ok = sum(names.values())
    assert batch["num_skipped"] == len(names) - n_ok
    assert batch["image"].shape == (n_ok, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["input_ids"].shape[0] == n_ok and batch["input_ids"].shape[1] <= 8
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["index"].tolist() == [i for i, ok in enumerate(names.values()) if ok]


def test_collator_all_skipped(vocab_file: Path) -> None:
    batch = ImageTextCollator(TextTokenizer.from_path(vocab_file, max_tokens=8))([None, None, None])
    assert batch["num_skipped"] == 3
    assert batch["image"].shape[:2] == (0, 3) and batch["input_ids"].shape[0] == 0
    assert batch["index"].shape == (0,)


def test_dataset_caption_list_and_seeded_draws(tmp_path: Path) -> None:
    _noise_image().save(tmp_path / "x.jpg")
    ann = _write_json(tmp_path / "a.json", [{"image": "x.jpg", "caption": ["One.", "Two!", "Three?"]}] * 4)
    ds = ImageTextDataset([str(ann)], transform=eval_transform(8), max_words=30, seed=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = [ds[i]["caption"] for i in range(4)]
    assert torch.equal(state, torch.get_rng_state())  # seeded samples leave the global RNG alone
    assert first == [ds[i]["caption"] for i in range(4)]
    seen = {ds[i]["caption"] for e in range(6) for i in range(4) if ds.set_epoch(e) is None}
    assert seen == {"one", "two", "three"}


def test_dataset_empty_annotation_list(tmp_path: Path) -> None:
    ann = _write_json(tmp_path / "empty.json", [])
    with pytest.raises(ValueError, match="empty.json"):
        ImageTextDataset([str(ann)], transform=eval_transform(8), max_words=30)


# ------------------------------------------------------------------------------------------------ sampler
def _shares(
    n: int, ws: int, bs: int, epoch: int = 0, seed: int = 0, drop_last: bool = True
) -> list[list[int]]:
    out = []
    for r in range(ws):
        s = ShardedEpochSampler(n, rank=r, world_size=ws, seed=seed, batch_size=bs, drop_last=drop_last)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


@pytest.mark.parametrize(
    "n, ws, bs, drop_last, total",
    [(50, 3, 4, True, 48), (53, 4, 4, True, 48), (53, 4, 4, False, 52), (10, 1, 3, True, 9)],
)
def test_sampler_ranks_disjoint_and_cover_truncated_epoch(
    n: int, ws: int, bs: int, drop_last: bool, total: int
) -> None:
    shares = _shares(n, ws, bs, drop_last=drop_last)
    flat = [i for s in shares for i in s]
    assert len(flat) == len(set(flat)) == total  # disjoint, no padding duplicates
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:total].tolist()
    assert set(flat) == set(perm)  # union is the truncated epoch
    assert len({len(s) for s in shares}) == 1
    s = ShardedEpochSampler(n, rank=0, world_size=ws, batch_size=bs, drop_last=drop_last)
    assert s.batches_per_epoch == -(-(total // ws) // bs)


def test_sampler_epochs_and_seeds() -> None:
    e0, e0_again, e1 = _shares(40, 2, 4, epoch=0), _shares(40, 2, 4, epoch=0), _shares(40, 2, 4, epoch=1)
    assert e0 == e0_again
    assert e0 != e1
    assert _shares(40, 2, 4, seed=1) != e0


def test_sampler_set_start_skips_batches() -> None:
    s = ShardedEpochSampler(100, rank=1, world_size=2, seed=3, batch_size=8)
    s.set_epoch(2)
    full = list(s)
    assert s.batches_per_epoch == 6 and len(full) == 48
    s.set_start(4)
    assert list(s) == full[32:] and len(s) == 16
    s.set_epoch(2)  # same epoch: the resume point stays
    assert len(s) == 16
    s.set_epoch(3)  # next epoch starts from the beginning
    assert len(s) == 48
    with pytest.raises(ValueError):
        s.set_start(7)


def test_sampler_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="world_size"):
        ShardedEpochSampler(10, world_size=2, batch_size=8)


# --------------------------------------------------------------------------------------- retrieval set
def test_retrieval_eval_set(tmp_path: Path) -> None:
    for i in range(3):
        _noise_image(seed=i).save(tmp_path / f"{i}.jpg")
    ann = _write_json(
        tmp_path / "eval.json",
        [
            {"image": "0.jpg", "caption": ["A red circle.", "Red-circle"], "image_id": "a"},
            {"image": "1.jpg", "caption": "Blue square"},
            {"image": "2.jpg", "caption": ["x", "y", "z"]},
        ],
    )
    ev = RetrievalEvalSet(str(ann), image_size=16, max_words=30)
    assert ev.texts == ["a red circle", "red circle", "blue square", "x", "y", "z"]
    assert ev.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert ev.txt2img == [0, 0, 1, 2, 2, 2]
    assert ev.images == [str(tmp_path / f"{i}.jpg") for i in range(3)]
    assert ev.image_ids[0] == "a"
    ds = ev.image_dataset()
    x, i = ds[2]
    assert x.shape == (3, 16, 16) and i == 2
    (tmp_path / "1.jpg").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="1.jpg"):
        ds[1]
    (tmp_path / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="2.jpg"):
        RetrievalEvalSet(str(ann), image_size=16, max_words=30)
