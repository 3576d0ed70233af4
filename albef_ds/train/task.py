"""What a task supplies to the one Trainer (`trainer.py`), and what the trainer hands it.

A task is only what differs between ALBEF's jobs: how to build its model, its training loader, the forward of
one micro-batch (losses + what to enqueue), the after-step (enqueue), its evaluation and the metric that picks
the best checkpoint. The trainer owns everything else: engine, schedules, the step protocol, monitor,
checkpoints, stop signals, resume and when to evaluate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..data import TextTokenizer
from .dist_env import DistInfo


@dataclass
class StepOutput:
    """One micro-batch's result: the loss to backpropagate, the values to log (in `Task.log_names` order,
    scalars kept on the device), the samples it held, and the tensors to enqueue after the optimizer step
    (concatenated over the micro-batches and passed to `Task.after_step`)."""

    loss: torch.Tensor
    logs: list[torch.Tensor]
    samples: int
    enqueue: tuple[torch.Tensor, ...] = ()


@dataclass
class TaskContext:
    """What the trainer knows when it asks a task for something."""

    cfg: Config
    info: DistInfo
    device: torch.device
    out_dir: Path
    tokenizer: TextTokenizer | None
    special_tokens: dict[str, int]
    # The queue's padded all-gather over the ranks (None on one process: the model's identity gather).
    all_gather: Callable | None = None
    input_dtype: torch.dtype = torch.float32  # the engine's input dtype (images are loaded in it)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def loader_args(self) -> dict:
        """The keywords every training loader builder takes: this rank's share, batch, seed, device, dtype."""
        return {
            "batch_size": self.cfg.train.batch_size,
            "seed": self.cfg.train.seed,
            "rank": self.info.rank,
            "world_size": self.info.world_size,
            "device": self.device,
            "dtype": self.input_dtype,
        }


class Task:
    """The base every task derives from; the defaults describe a task without queue or validation."""

    name = "task"
    log_names: tuple[str, ...] = ("loss",)  # the first is the total loss
    best_metric: str | None = None  # validation metric that picks checkpoint_best.pt (higher is better)
    min_batch = 1  # fewer decodable samples in a batch is an error

    def check_inputs(self, cfg: Config) -> None:
        """Raise a ConfigError naming the key when an input file is missing (before anything is built)."""

    def build_model(self, ctx: TaskContext, *, init: str | None = None) -> nn.Module:
        """The task's model with its configured initialisation; `init` (any weight source) overrides the
        task's default whole-model checkpoint (None: the configured one)."""
        raise NotImplementedError

    def train_loader(self, ctx: TaskContext):
        """(loader, sampler): the loader yields batch dicts; the sampler has set_epoch,
        set_start(batches_done, skipped) and batches_per_epoch (this rank's batches per epoch)."""
        raise NotImplementedError

    def forward(self, call: Callable[..., Any], batch: dict, *, alpha: float) -> StepOutput:
        """Losses of one micro-batch; `call(**inputs)` runs the model through the engine."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, *enqueued: torch.Tensor) -> None:
        """Once per optimizer step, after it: e.g. the queue write of every micro-batch's features."""

    def batch_len(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    def eval_every(self) -> int:
        """Validate every N epochs (and after the last step); 0 = only after the last step."""
        return 0

    def has_split(self, split: str) -> bool:
        """Whether an evaluation split ("val" or "test") is configured."""
        return False

    def default_eval_file(self) -> str:
        """The file `albef-ds evaluate TASK` evaluates without --split-file ("" = none configured)."""
        return ""

    def open_split(self, path: str) -> Any:
        """An evaluation set read from `path` (what `evaluate(..., eval_set=)` takes)."""
        raise NotImplementedError(f"task {self.name} has no file-based evaluation")

    def evaluate(self, model: nn.Module, split: str, ctx: TaskContext, *, step: int = 0) -> dict | None:
        """Metrics of `split` on every rank (the same dict on every rank when `best_metric` is set), or None
        on ranks that do not take part. May run collectives: every rank calls it."""
        return None

    def baseline(self, ctx: TaskContext, result: dict) -> dict:
        """Reference numbers for results.json (chance level, the model before training, ...)."""
        return {}

    def log_extra(self, model: nn.Module) -> dict:
        """Extra scalars for a training log record (read once per log window)."""
        return {}
