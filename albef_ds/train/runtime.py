"""Process set-up shared by every job: the device, seeds, the tokenizer, stop signals, rank-aware logging."""

from __future__ import annotations

import logging
import random
import signal

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data import TextTokenizer

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 85  # exit status after a signal-triggered checkpoint: "requeue me" for the launcher


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" = this rank's GPU (cuda:local_rank) when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_tokenizer(cfg: Config) -> TextTokenizer:
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: give a vocab.txt or a bert-base-uncased folder")
    tok = TextTokenizer.from_path(
        cfg.data.tokenizer, max_tokens=cfg.data.max_tokens, mode=cfg.data.tokenizer_mode
    )
    if tok.vocab_size != cfg.model.text.vocab_size:
        raise ConfigError(
            f"model.text.vocab_size ({cfg.model.text.vocab_size}) differs from the vocabulary of "
            f"data.tokenizer ({cfg.data.tokenizer}: {tok.vocab_size} tokens)"
        )
    return tok


def special_tokens(tokenizer: TextTokenizer) -> dict[str, int]:
    return {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "mask": tokenizer.mask_token_id}


class StopSignals:
    """SIGTERM / SIGUSR1 set a flag; the trainer finishes the current step, checkpoints and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignals:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int) -> None:
        prefix = f"[rank {rank}] " if rank > 0 else ""
        super().__init__(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S")


def configure_logging(level: str = "INFO", *, rank: int = 0) -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors, prefixed with their rank (so a
    multi-rank run prints each INFO line once)."""
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    if rank > 0:
        lvl = max(lvl, logging.WARNING)
    root = logging.getLogger()
    root.setLevel(lvl)
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for h in root.handlers:
        h.setFormatter(_RankFormatter(rank))
    quiet_deepspeed()


def quiet_deepspeed() -> None:
    """DeepSpeed logs its config dump and set-up at INFO from every rank, on a logger of its own that its
    import configures; keep it to warnings (call again after deepspeed is imported)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
