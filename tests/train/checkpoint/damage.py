"""Ways to damage a real checkpoint folder (shared by the integrity tests): truncation, flipped tensor bytes,
garbage, and a hostile pickle whose `__reduce__` creates a canary file when unpickled with code execution."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import torch


class Payload:
    """Unpickled with weights_only=False, this calls open(canary, "w"): the canary's existence proves the
    pickle ran code."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def plant_payload(path: Path, canary: Path) -> None:
    """Rewrite `path` (a torch file holding a dict) with the payload added next to its real contents."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: safe to read
    state["evil"] = Payload(canary)
    torch.save(state, path)


def forge_manifest(folder: Path) -> None:
    """What an attacker who can write the folder does too: make the manifest (if there is one) match the
    files as they are now, so only the weights_only unpickling stands between the payload and a resume."""
    mf = folder / "manifest.json"
    if not mf.is_file():
        return
    body = json.loads(mf.read_text())
    for name, entry in body["files"].items():
        p = folder / name
        entry["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        entry["bytes"] = p.stat().st_size
    mf.write_text(json.dumps(body))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_tensor_bytes(path: Path) -> None:
    """Flip 8 bytes in the middle of the largest tensor record of a zip-format torch file: the file still
    loads (torch checks no checksum of tensor data), with one tensor silently changed."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # Local file header: 30 bytes, then the name and the extra field (lengths at offsets 26 and 28).
    h = info.header_offset
    start = (
        h
        + 30
        + int.from_bytes(raw[h + 26 : h + 28], "little")
        + int.from_bytes(raw[h + 28 : h + 30], "little")
    )
    mid = start + info.file_size // 2
    for i in range(mid, mid + 8):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
