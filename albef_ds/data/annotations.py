"""JSON annotation lists: reading, validation and path resolution (the bottom of the source layer).

The reference layout is a JSON list ``[{"image": path, "caption": str | [str], "image_id": ...}, ...]``.
Every format error names the file, the entry and the field. `sources.JsonListSource` is built on
`load_annotations`; the Karpathy-split checks (`karpathy.check_karpathy_*`) read their lists with
`read_json_list`. `read_json` and `write_json_atomic` read and write any JSON file (the grounding layouts);
`require_fields` checks an entry's keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | Path, *, what: str) -> Any:
    """The JSON value in `path`; errors (missing file, invalid JSON) start with `what` and the path."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist")
    try:
        with p.open("r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {p} is not valid JSON: {e}") from e


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write `data` as JSON to `path` through a temporary sibling renamed into place (readers never see a
    half-written file; concurrent writers of the same content do not collide); creates the folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=0), encoding="utf-8")
    tmp.replace(p)
    return p


def require_fields(entry: Any, where: str, fields: tuple[str, ...], *, kind: str = "an object") -> dict:
    """`entry` when it is a dict holding every key of `fields`; else a ValueError starting with `where` (the
    file and entry) that names the missing field. `kind`: what the entry must be, for the message."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be {kind} with {', '.join(fields)}; got {type(entry).__name__}")
    for key in fields:
        if key not in entry:
            raise ValueError(f"{where} has no field '{key}' (entries need {', '.join(fields)})")
    return entry


def read_json_list(path: str | Path, *, what: str = "annotation file", non_empty: bool = False) -> list:
    """The JSON list in `path`; errors (missing file, invalid JSON, not a list, empty when `non_empty`) start
    with `what` and the path."""
    p = Path(path)
    data = read_json(p, what=what)
    if non_empty:
        if not isinstance(data, list) or not data:
            raise ValueError(f"{what} {p} must hold a non-empty JSON list of entries")
    elif not isinstance(data, list):
        raise ValueError(f"{what} {p} must hold a JSON list of entries, got {type(data).__name__}")
    return data


def _check_entry(entry: Any, i: int, path: Path) -> None:
    where = f"annotation file {path}: entry {i}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with 'image' and 'caption', got {type(entry).__name__}")
    for key in ("image", "caption"):
        if key not in entry:
            raise ValueError(f"{where} has no field '{key}'")
    if not isinstance(entry["image"], str) or not entry["image"]:
        raise ValueError(f"{where}: field 'image' must be a non-empty str, got {entry['image']!r}")
    cap = entry["caption"]
    if isinstance(cap, list):
        if not cap:
            raise ValueError(f"{where}: field 'caption' is an empty list")
        bad = [j for j, c in enumerate(cap) if not isinstance(c, str)]
        if bad:
            raise ValueError(
                f"{where}: field 'caption' must be a str or a list of str; item {bad[0]} is "
                f"{type(cap[bad[0]]).__name__}"
            )
    elif not isinstance(cap, str):
        raise ValueError(f"{where}: field 'caption' must be a str or a list of str, got {type(cap).__name__}")


def load_annotations(path: str | Path, image_root: str = "") -> list[dict]:
    """Read and validate a JSON list of {"image": str, "caption": str | [str], optional "image_id"}.

    Relative image paths are resolved against `image_root` when given, else against the JSON file's folder;
    the returned entries hold absolute image paths and the captions as given (uncleaned).
    """
    p = Path(path)
    data = read_json_list(p)
    root = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(p))
    out = []
    for i, entry in enumerate(data):
        _check_entry(entry, i, p)
        e = dict(entry)
        e["image"] = os.path.join(root, e["image"])  # join keeps an absolute entry path as it is
        out.append(e)
    return out
