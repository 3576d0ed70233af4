"""Checkpoint files: atomic writes, the `latest` pointer, pruning, and per-rank RNG states.

Layout of a run folder:
    checkpoints/<tag>/...          engine state (ours: state.pt; DeepSpeed: its own files) + rng_rank<N>.pt
                                   (the rank's RNG states and, under "rank", its data position)
    checkpoints/<tag>/albef_ds.json  our client state (step, epoch, position, world size, config) as JSON
    checkpoints/latest             the tag of the newest *complete* checkpoint (written last, atomically)
    checkpoints/universal/<tag>    DeepSpeed universal conversion of <tag>, made when resuming on another
                                   number of ranks
    checkpoint.pt                  consolidated weights for evaluation / export (written at the end)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """write() into a temp file in the same folder, fsync, rename: a crash never leaves a torn file, and
    a failed write removes its temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: Path) -> Path:
    return _atomic_write(path, lambda f: torch.save(obj, f))


CLIENT_FILE = "albef_ds.json"


def write_client(folder: Path, client: dict) -> Path:
    return atomic_write_bytes(folder / CLIENT_FILE, json.dumps(client, indent=1).encode())


def read_client(folder: Path) -> dict | None:
    """The client state a checkpoint folder holds as JSON (None for a folder written before it existed)."""
    f = folder / CLIENT_FILE
    if not f.is_file():
        return None
    try:
        client = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); the checkpoint folder is damaged") from e
    for key in ("step", "epoch", "batches_in_epoch", "world_size"):
        if not isinstance(client.get(key), int):
            raise ValueError(f"{f}: field {key!r} is missing or not an integer")
    return client


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(root: Path) -> str | None:
    """The tag `latest` names, if that checkpoint folder exists."""
    f = root / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if tag and (root / tag).is_dir() else None


def publish(root: Path, tag: str, keep_last: int) -> None:
    """Point `latest` at a checkpoint all ranks have finished, then drop all but the newest keep_last."""
    atomic_write_bytes(root / "latest", (tag + "\n").encode())
    if keep_last > 0:
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in tags[:-keep_last]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)
                shutil.rmtree(root / "universal" / old, ignore_errors=True)


def rng_state() -> dict:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts (tensors, ints, tuples)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
