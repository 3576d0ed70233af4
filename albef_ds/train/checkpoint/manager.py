"""The one owner of resumable checkpoints: save, publish `latest`, keep-last, per-rank RNG, resume.

Engines supply only their primitives (`save(root, tag, client)`, `load(root, tag) -> client`, `barrier()`);
everything around them (which tag, the client file, the RNG files, when `latest` moves) is here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...config import Config, ConfigError, config_to_dict
from .files import atomic_torch_save, publish, read_client, read_latest, rng_state, step_tag, write_client

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
    """Resumable checkpoints under `root` (a run's `checkpoints/` folder), for one rank of `world_size`."""

    def __init__(self, root: Path, *, rank: int, world_size: int, keep_last: int) -> None:
        self.root = Path(root)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    def resolve(self, resume: str) -> str | None:
        """The tag train.resume names: "" = none, "auto" = `latest` (None when there is none yet), else a
        tag (or a path ending in one) that must exist."""
        if not resume:
            return None
        if resume == "auto":
            return read_latest(self.root)
        tag = Path(resume).name
        if not (self.root / tag).is_dir():
            raise ConfigError(f"train.resume = {resume!r}: no checkpoint folder {self.root / tag}")
        return tag

    def client(self, tag: str) -> dict | None:
        """The client state of `tag` as written (readable before any engine exists)."""
        return read_client(self.root / tag)

    def save(self, engine, step: int, client: dict, rank_state: dict | None = None) -> str:
        """Every rank: the engine's state and its RNG state (with `rank_state`, this rank's own ints: its
        data position); rank 0: the client file; then, once every rank has written its part (barrier),
        rank 0 moves `latest` and drops checkpoints beyond keep_last."""
        tag = step_tag(step)
        engine.save(self.root, tag, client)
        atomic_torch_save(
            {**rng_state(), "rank": rank_state or {}}, self.root / tag / f"rng_rank{self.rank}.pt"
        )
        if self.rank == 0:
            write_client(self.root / tag, client)
        engine.barrier()
        if self.rank == 0:
            publish(self.root, tag, self.keep_last)
            log.info("checkpoint %s complete", self.root / tag)
        return tag

    def load(self, engine, tag: str) -> tuple[dict, dict | None]:
        """(client state, this rank's RNG state or None) of `tag`, loaded into `engine`. The RNG state (its
        "rank" entry: the `rank_state` saved) is only returned for a checkpoint of the same rank count
        (another count draws other streams and splits the data otherwise anyway)."""
        client = engine.load(self.root, tag)
        rng_file = self.root / tag / f"rng_rank{self.rank}.pt"
        rng = None
        if client["world_size"] == self.world_size and rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
        return client, rng
