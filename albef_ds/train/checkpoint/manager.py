"""The one owner of resumable checkpoints: save, publish `latest`, keep-last, per-rank RNG, resume.

Engines supply only their primitives (`save(root, tag, client)`, `load(root, tag) -> client`, `barrier()`);
everything around them (which tag, the client file, the RNG files, when `latest` moves) is here.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ...config import Config, ConfigError, config_to_dict
from .files import atomic_torch_save, publish, read_client, rng_state, step_tag, write_client
from .integrity import MANIFEST_FILE, CheckpointError, safe_load, verify_checkpoint, write_manifest

log = logging.getLogger(__name__)


def save_consolidated(
    path: Path, state_dict: dict[str, torch.Tensor], config: Config | dict, **state
) -> Path:
    """Consolidated fp32 weights (+ config and extra fields) for evaluation and export; atomic."""
    from ...model.weights import OUR_FORMAT

    if isinstance(config, Config):
        config = config_to_dict(config)

    payload = {
        "albef_ds_format": OUR_FORMAT,
        "model": {
            k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()
        },
        "config": config,
        **state,
    }
    return atomic_torch_save(payload, Path(path))


class CheckpointManager:
    """Resumable checkpoints under `root` (a run's `checkpoints/` folder), for one rank of `world_size`.

    `share(obj)` gives every rank rank 0's `obj` and `gather(obj)` every rank's `obj` in rank order (the
    identity and a one-item list for one process): the resume decision is made once, on rank 0, and every
    rank then follows it or raises the same error, so no rank fails alone while the others wait for it.
    """

    def __init__(
        self,
        root: Path,
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        share: Callable[[object], object] | None = None,
        gather: Callable[[object], list] | None = None,
    ) -> None:
        self.root = Path(root)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.share = share or (lambda obj: obj)
        self.gather = gather or (lambda obj: [obj])

    # -------------------------------------------------------------------------------- which checkpoint
    def resolve(self, resume: str) -> str | None:
        """The tag train.resume names, verified (integrity.verify_checkpoint): "" = none; "auto" = the one
        `latest` names, else (loudly) the newest complete, verified one, None when there is none and no
        `latest` either; else a tag (or a path ending in one) that must exist and verify. Rank 0 decides and
        every rank gets its decision: the same tag, or the same ConfigError / CheckpointError."""
        if not resume:
            return None
        decision: tuple = ("ok", None)
        if self.rank == 0:
            try:
                decision = ("ok", self._choose(resume))
            except ConfigError as e:
                decision = ("config", str(e))
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, not only rank 0
                decision = ("checkpoint", str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        kind, value = self.share(decision)
        if kind == "config":
            raise ConfigError(value)
        if kind == "checkpoint":
            raise CheckpointError(value)
        return value

    def _choose(self, resume: str) -> str | None:
        if resume != "auto":
            tag = Path(resume).name
            if not (self.root / tag).is_dir():
                raise ConfigError(f"train.resume = {resume!r}: no checkpoint folder {self.root / tag}")
            self._verify(tag)
            self._clear_newer(tag)
            return tag
        latest = self.root / "latest"
        problem = refused = None
        if latest.is_file():
            tag, problem = self._latest_problem(latest)
            if problem is None:
                try:
                    self._verify(tag)
                    self._clear_newer(tag)
                    return tag
                except CheckpointError as e:
                    problem, refused = f"names {tag}, which is damaged: {e}", tag
            log.error("%s %s", latest, problem)
        rejected: list[str] = []
        for tag in reversed(self._step_tags()):
            if tag == refused:  # verified and refused just above
                continue
            if not (self.root / tag / MANIFEST_FILE).is_file():
                rejected.append(f"{tag}: incomplete (no {MANIFEST_FILE})")
                continue
            try:
                self._verify(tag)
            except CheckpointError as e:
                log.error("checkpoint %s is damaged: %s", self.root / tag, e)
                rejected.append(f"{tag}: {e}")
                continue
            log.warning(
                "RESUMING FROM AN OLDER CHECKPOINT: %s (the newest complete, verified one), because %s",
                self.root / tag,
                problem or f"there is no {latest}",
            )
            self._clear_newer(tag)
            return tag
        if problem is None:  # no `latest`: no save ever finished (folders left are an interrupted first save)
            self._clear_newer(None)
            return None
        raise CheckpointError(
            f"cannot resume from {self.root}: {latest} {problem}, and no other checkpoint there is complete "
            f"and verified ({'; '.join(rejected) or 'there is none'}). Resume from a tag explicitly "
            "(train.resume=step_...), or move the checkpoints away to start afresh"
        )

    def _latest_problem(self, latest: Path) -> tuple[str, str | None]:
        """(tag, None) for a `latest` naming an existing checkpoint folder, else (whatever, the problem)."""
        try:
            tag = latest.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            return "", f"is unreadable ({e})"
        if not tag:
            return "", "is empty"
        if not _TAG.fullmatch(tag):
            return tag, f"holds {tag[:60]!r}, not a checkpoint tag (step_ and 8 digits)"
        if not (self.root / tag).is_dir():
            return tag, f"names {tag}, which is not in {self.root}"
        return tag, None

    def _step_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _TAG.fullmatch(p.name))

    def _verify(self, tag: str) -> None:
        if not verify_checkpoint(self.root / tag):
            log.warning(
                "checkpoint %s has no %s (written before checksums existed): its files are checked for "
                "completeness and safe loading, not for silent corruption",
                self.root / tag,
                MANIFEST_FILE,
            )

    def _clear_newer(self, tag: str | None) -> None:
        """Folders newer than the checkpoint resumed are from a timeline this run abandons: moved to
        checkpoints/rejected/ (kept for inspection), so that this run neither prunes its good checkpoints for
        them nor writes into them. One without a manifest newer than a checkpoint with one is an interrupted
        save, and deleted."""
        debris = tag is not None and (self.root / tag / MANIFEST_FILE).is_file()
        for old in self._step_tags():
            if tag is not None and old <= tag:
                continue
            folder = self.root / old
            if debris and not (folder / MANIFEST_FILE).is_file():
                log.warning("removing %s: an interrupted save (no %s)", folder, MANIFEST_FILE)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            dst = self.root / "rejected" / old
            shutil.rmtree(dst, ignore_errors=True)
            dst.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(dst)
            log.warning("moved %s to %s: it is newer than the checkpoint resumed", folder, dst)

    def client(self, tag: str) -> dict | None:
        """The client state of `tag` as written (readable before any engine exists)."""
        return read_client(self.root / tag)

    # ------------------------------------------------------------------------------------ save and load
    def save(self, engine, step: int, client: dict, rank_state: dict | None = None) -> str:
        """Every rank: the engine's state and its RNG state (with `rank_state`, this rank's own ints: its
        data position); rank 0: the client file; then, once every rank has written its part (barrier),
        rank 0 writes the manifest (a sha256 per file), moves `latest` and drops checkpoints beyond
        keep_last."""
        tag = step_tag(step)
        engine.save(self.root, tag, client)
        atomic_torch_save(
            {**rng_state(), "rank": rank_state or {}}, self.root / tag / f"rng_rank{self.rank}.pt"
        )
        if self.rank == 0:
            write_client(self.root / tag, client)
        engine.barrier()
        if self.rank == 0:
            write_manifest(self.root / tag)
            publish(self.root, tag, self.keep_last)
            log.info("checkpoint %s complete", self.root / tag)
        return tag

    def load(self, engine, tag: str) -> tuple[dict, dict | None]:
        """(client state, this rank's RNG state or None) of `tag`, loaded into `engine`. The RNG state (its
        "rank" entry: the `rank_state` saved) is only returned for a checkpoint of the same rank count
        (another count draws other streams and splits the data otherwise anyway). A rank that fails tells
        the others (gather): every rank raises the same CheckpointError."""
        error = None
        client: dict = {}
        rng = None
        try:
            client = engine.load(self.root, tag)
            rng_file = self.root / tag / f"rng_rank{self.rank}.pt"
            if client["world_size"] == self.world_size and rng_file.is_file():
                rng = safe_load(rng_file)
                for key in ("python", "numpy", "torch"):
                    if key not in rng:
                        raise CheckpointError(f"{rng_file}: no {key!r} RNG state")
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = " ".join(f"{type(e).__name__}: {e}".split())
        errors = [(r, m) for r, m in enumerate(self.gather(error)) if m]
        if errors:
            raise CheckpointError(
                f"resuming from {self.root / tag} failed: " + "; ".join(f"rank {r}: {m}" for r, m in errors)
            )
        return client, rng


_TAG = re.compile(r"step_\d{8}")
