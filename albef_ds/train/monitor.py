"""What a run reports while it trains (rank 0 only): JSON lines, TensorBoard scalars and a progress bar.

Values arrive here already on the host (the loop reads its device accumulators once per log window), so
nothing in this file adds a host-device sync per step.

TensorBoard tags (under <run>/tensorboard):
    loss/total, loss/itc, loss/itm, loss/mlm        mean over the log window
    train/lr, train/alpha, train/temp
    perf/samples_per_s (global), perf/step_time_s (mean over the window), perf/peak_mem_gb
    data/skipped_images                             undecodable images skipped so far (this rank)
    eval/<metric>                                   retrieval metrics (txt_r1, img_r1, r_mean, ...)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or this process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsFile:
    """JSON lines under the run folder. Records are appended (an earlier run's are kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Monitor:
    """Rank 0's reporting; on other ranks every method is a no-op."""

    # Record key -> TensorBoard tag; losses are "loss" (loss/total) and "loss_<name>" (loss/<name>).
    SCALARS = {
        "loss": "loss/total",
        "lr": "train/lr",
        "alpha": "train/alpha",
        "temp": "train/temp",
        "samples_per_s": "perf/samples_per_s",
        "step_time_s": "perf/step_time_s",
        "peak_mem_gb": "perf/peak_mem_gb",
        "skipped_images": "data/skipped_images",
    }

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        total_steps: int,
        start_step: int,
        desc: str = "pretrain",
    ) -> None:
        self.enabled = enabled
        self.metrics = MetricsFile(out_dir / "metrics.jsonl") if enabled else None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - tensorboard is in requirements.txt
                raise RuntimeError(
                    "train.tensorboard=true needs the tensorboard package (pip install tensorboard), or set "
                    "train.tensorboard=false"
                ) from e
            self.tb = SummaryWriter(
                log_dir=str(out_dir / "tensorboard"), purge_step=start_step or None, flush_secs=30
            )
        atexit.register(self.close)  # a run that dies still flushes what it logged
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0 if tty else 30.0,  # a log file gets a line every 30 s, not a flood
            file=sys.stderr,
        )

    def write(self, record: dict) -> None:
        if self.metrics:
            self.metrics.write(record)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def train(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(rec)
        if self.tb is not None:
            for key, value in rec.items():
                tag = self.SCALARS.get(key) or (f"loss/{key[5:]}" if key.startswith("loss_") else None)
                if tag is not None:
                    self.tb.add_scalar(tag, value, rec["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.1f}", refresh=False)

    def eval(self, tag: str, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write({"event": f"eval_{tag}", "step": step, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"eval/{k}", v, step)

    def redirect_logging(self):
        """Log lines printed above the progress bar instead of through it (rank 0)."""
        if self.bar is None or not sys.stderr.isatty():
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


class LogWindow:
    """Losses summed on the device between log records (read once per window: the only host sync), with
    the window's sample and step counts for samples/s and step time, and the run's ETA.

    `add(losses, samples)` per micro-batch, `step()` per optimizer step, `read(...)` at a log step returns
    the record fields (mean of each loss by name, samples/s over all ranks, step time, peak memory, ETA) and
    starts a new window. A non-finite mean is a FloatingPointError naming the step and the rank."""

    def __init__(self, names: tuple[str, ...], device: torch.device, *, world_size: int, start_step: int):
        self.names = names
        self.device = device
        self.world_size = world_size
        self.start_step = start_step
        self.acc = torch.zeros(len(names), device=device)
        self.n = self.samples = self.steps = 0
        self.t_window = self.t_start = time.perf_counter()

    def add(self, losses: list[torch.Tensor], samples: int) -> None:
        self.acc += torch.stack(losses).detach().float()
        self.n += 1
        self.samples += samples

    def step(self) -> None:
        self.steps += 1

    def read(self, done: int, total_steps: int, rank: int) -> dict:
        vals = (self.acc / max(self.n, 1)).tolist()
        if not all(math.isfinite(v) for v in vals):
            raise FloatingPointError(
                f"non-finite loss at step {done} on rank {rank}: {dict(zip(self.names, vals))}"
            )
        now = time.perf_counter()
        dt = now - self.t_window
        rec = dict(zip(self.names, vals))
        rec["samples_per_s"] = self.samples * self.world_size / dt
        rec["step_time_s"] = dt / max(self.steps, 1)
        rec["peak_mem_gb"] = peak_memory_gb(self.device)
        eta = (now - self.t_start) / max(done - self.start_step, 1) * (total_steps - done)
        self.acc.zero_()
        self.n = self.samples = self.steps = 0
        self.t_window = time.perf_counter()
        return {**rec, "eta_s": eta}
