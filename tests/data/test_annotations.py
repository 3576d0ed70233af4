"""annotations.py: reading, checking and resolving JSON annotation lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from albef_ds.data import load_annotations


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


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
