"""evalset.py: the retrieval eval set (captions, index maps) and its image dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef_ds.data import RetrievalEvalSet


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _noise_image(size: int = 40, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr)


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
