"""datasets.py: the image-text dataset (decoding, skipping, seeded draws) and the batch collator."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.data import ImageTextCollator, ImageTextDataset, TextTokenizer, eval_transform


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _noise_image(size: int = 40, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr)


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
