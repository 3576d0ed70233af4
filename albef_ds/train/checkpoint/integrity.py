"""Checkpoint integrity: per-file checksums (the manifest), safe unpickling, and the verification a
checkpoint folder passes before any rank resumes from it.

- `write_manifest(folder)`: the sha256 and size of every file of a finished checkpoint, written by rank 0
  after every rank has written its part and before `latest` moves; `verify_checkpoint` checks them, so a
  truncated, torn or bit-flipped file (and a missing rank file) is found and named before anything loads.
- `scan_files(folder)`: every `.pt` file unpickled with `torch.load(weights_only=True)` (DeepSpeed's own
  classes allow-listed by name): a file holding code (a `__reduce__` payload) is refused by name, whatever the
  manifest says (a manifest only proves the files are as written, not who wrote them).
- `weights_only_loads()`: while DeepSpeed reads a checkpoint (its engine's load_checkpoint, the universal
  conversion), every `torch.load` is forced to weights_only=True. DeepSpeed 0.19.8 calls
  `torch.load(..., weights_only=False)` in some twenty places (TorchCheckpointEngine.load, ds_to_universal,
  universal_checkpoint, ...); replacing `torch.load` for the duration of our call reaches all of them, and
  it can only make a load stricter, never looser, for anything else that loads meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .files import atomic_write_bytes, read_client

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint folder (or `latest`) that cannot be resumed from; the message names the file."""


# --------------------------------------------------------------------------------------- safe loading
def ds_safe_globals() -> list:
    """The classes DeepSpeed 0.19.8 pickles into its optimizer files (a loss scaler, the ZeRO stage enum,
    fragment addresses), allowed by name to `torch.load(weights_only=True)`; nothing else is."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safe_globals() -> list:
    try:
        return ds_safe_globals()
    except ImportError:  # the torch engine without deepspeed installed: plain tensors and containers only
        return []


def _name(f) -> str:
    return str(f) if isinstance(f, str | os.PathLike) else getattr(f, "name", repr(f))


def safe_load(path: str | os.PathLike, *, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) with DeepSpeed's classes allowed; any failure (a refused global, a
    truncated or corrupt file) is a CheckpointError naming the file. mmap: read the pickle only and map the
    tensor data lazily (zip-format files; others are read whole)."""
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(_unloadable(path, e)) from e


def _unloadable(name, e: Exception) -> str:
    """One line naming the file. torch's refusal of a global advises weights_only=False, exactly what must
    not be done with a hostile file: it is replaced by what was found."""
    msg = " ".join(str(e).split())
    found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if found:
        return (
            f"{name} holds a pickled reference to {found.group(1)}, which no checkpoint of ours contains; "
            "refused (weights_only=True), since unpickling it could run code"
        )
    return f"{name} is not a loadable checkpoint file (weights_only=True): {type(e).__name__}: {msg}"


# The real loader, also while weights_only_loads() has replaced torch.load (torch.load is this function).
_TORCH_LOAD = torch.serialization.load


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: `torch.load` is weights_only=True (DeepSpeed's classes allowed) whatever its caller asked,
    and a file it cannot load is a CheckpointError naming the file. Whatever torch.load was is restored on
    exit."""
    globs = _safe_globals()

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        # pickle_module is dropped: weights_only has its own restricted unpickler.
        try:
            with torch.serialization.safe_globals(globs):
                return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise CheckpointError(_unloadable(_name(f), e)) from e

    previous = torch.load
    torch.load = load
    try:
        yield
    finally:
        torch.load = previous


# ------------------------------------------------------------------------------------------ checksums
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder (recursively), without the manifest and hidden temp files."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_FILE
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def write_manifest(folder: Path) -> Path:
    """sha256 and size of every file in `folder`, atomically into folder/manifest.json."""
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in _files(folder)
    }
    body = {"format": MANIFEST_FORMAT, "files": files}
    return atomic_write_bytes(folder / MANIFEST_FILE, json.dumps(body, indent=1).encode())


def verify_manifest(folder: Path) -> bool:
    """Check every file the manifest lists (present, same size, same sha256). False: no manifest (a
    checkpoint written before manifests existed, or one whose save did not finish); a mismatch is a
    CheckpointError naming the file."""
    mf = folder / MANIFEST_FILE
    if not mf.is_file():
        return False
    try:
        body = json.loads(mf.read_bytes())
        files = body["files"]
        if body.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            raise ValueError(f"format {body.get('format')!r} with {len(files)} files")
        entries = [(name, str(e["sha256"]), int(e["bytes"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{mf} is damaged ({e}); expected JSON with a sha256 per file") from e
    for name, want, size in entries:
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {mf})")
        if p.stat().st_size != size:
            raise CheckpointError(
                f"{p} has {p.stat().st_size} bytes, {size} were written (a truncated or replaced file)"
            )
        got = sha256_file(p)
        if got != want:
            raise CheckpointError(f"{p}: sha256 {got[:16]}... differs from {want[:16]}... written with it")
    return True


# --------------------------------------------------------------------------------------- verification
def expected_files(folder: Path, client: dict | None) -> list[str]:
    """The files a complete checkpoint of this engine and rank count must hold."""
    ds = (folder / "mp_rank_00_model_states.pt").is_file() or not (folder / "state.pt").is_file()
    if not ds:
        return ["state.pt"]
    names = ["mp_rank_00_model_states.pt"]
    if client is not None:
        names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(client["world_size"])]
    return names


def scan_files(folder: Path) -> None:
    """Unpickle every .pt file under `folder` with weights_only=True (tensor data mapped, not read): a
    payload or an unreadable file is a CheckpointError naming it."""
    for p in _files(folder):
        if p.suffix == ".pt":
            safe_load(p, mmap=True)


def verify_checkpoint(folder: Path) -> bool:
    """Everything a resume needs from `folder`, checked without loading into any engine: the manifest's
    checksums, the client file, the files its engine and rank count need, a safe unpickling of each file.
    Returns whether a manifest vouched for it (False: accepted without checksums); raises CheckpointError
    naming the first bad file."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    checked = verify_manifest(folder)
    try:
        client = read_client(folder)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    need = expected_files(folder, client)
    if client is not None:
        need += [f"rng_rank{r}.pt" for r in range(client["world_size"])]
    for name in need:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing (a checkpoint of this run needs it)")
    scan_files(folder)
    return checked
