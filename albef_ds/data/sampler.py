"""Sample order and per-sample seeds, shared by every loader backend (torch reference and DALI).

`ShardedEpochSampler` decides which indices a rank sees, in which order, and where a resumed epoch
restarts; `refill_batches` fills each batch with usable samples from this rank's order (both backends);
`sample_seed` gives each (seed, epoch, index) its own RNG seed, so a sample's augmentation depends on nothing
else (not the number of workers, not the resume point, not the backend's threading).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Sampler

T = TypeVar("T")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of sample `index` in `epoch` of a run seeded with `seed`: one 63-bit int."""
    # Mix (seed, epoch, index) so neighbouring samples get unrelated RNG streams.
    mask = (1 << 64) - 1
    state = np.random.SeedSequence([seed & mask, epoch & mask, index & mask]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class ShardedEpochSampler(Sampler[int]):
    """Seeded per-epoch shuffle, split into disjoint per-rank shares, resumable mid-epoch.

    Epoch e uses the permutation of `torch.Generator().manual_seed(seed + epoch)`. The global order is cut to
    a multiple of world_size * batch_size (drop_last) or of world_size, never padded with duplicates, and
    rank r takes every world_size-th index from position r. `set_start(n)` skips this rank's first n batches
    of the current epoch; a later `set_epoch` with a different epoch clears it.

    Batches refilled after unusable images (`refill_batches`) consume more than batch_size samples each: they
    read `stream()`, this rank's order from the start position on, continued from the start of the order
    once it runs out (so every rank still makes `batches_per_epoch` batches and the ranks stay in step).
    A resume then starts at `set_start(batches_done, skipped)`: the samples those batches consumed, skipped
    ones included.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batch_size: int,
        drop_last: bool = True,
        on_set_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        per_step = world_size * batch_size if drop_last else world_size
        if num_samples < per_step:
            raise ValueError(
                f"{num_samples} samples cannot fill one step of world_size ({world_size}) x batch_size "
                f"({batch_size}); use a larger data set or a smaller batch"
            )
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.total = num_samples // per_step * per_step  # samples used per epoch over all ranks
        self.per_rank = self.total // world_size
        self.epoch = 0
        self.start_batch = 0
        self.start_skipped = 0  # unusable samples the skipped batches consumed besides their batch_size each
        self._on_set_epoch = on_set_epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a full epoch (ignores set_start)."""
        return -(-self.per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = self.start_skipped = 0
        self.epoch = epoch
        if self._on_set_epoch is not None:
            self._on_set_epoch(epoch)

    def set_start(self, batches_done: int, skipped: int = 0) -> None:
        """Start the current epoch after `batches_done` batches that skipped `skipped` unusable samples in
        all (refilled batches: `stream()` starts at batches_done * batch_size + skipped)."""
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done must lie in [0, {self.batches_per_epoch}], got {batches_done}")
        if skipped < 0:
            raise ValueError(f"skipped must be >= 0, got {skipped}")
        self.start_batch = batches_done
        self.start_skipped = skipped

    def stream(self) -> Iterator[int]:
        """This rank's order from the start position (set_start, skipped samples included), continued
        cyclically from the start of the order: an endless stream, read until enough batches are full."""
        order = self.rank_indices()
        pos = self.start_batch * self.batch_size + self.start_skipped
        while True:
            yield order[pos % len(order)]
            pos += 1

    def _skip(self) -> int:
        return min(self.start_batch * self.batch_size, self.per_rank)

    def rank_indices(self) -> list[int]:
        """This rank's indices for the current epoch, before set_start is applied."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)[: self.total]  # [total]
        return order[self.rank :: self.world_size].tolist()  # [per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self._skip() :])

    def __len__(self) -> int:
        return self.per_rank - self._skip()


def refill_batches(
    stream: Iterator[tuple[int, T | None]], batch_size: int, num_batches: int, *, limit: int
) -> Iterator[tuple[list[tuple[int, T]], int]]:
    """Group a stream of (index, item or None = unusable) into `num_batches` batches of exactly
    `batch_size` usable (index, item) pairs, in stream order: a batch that meets unusable samples is filled
    up from the next ones. Yields (batch, how many unusable samples it consumed). Deterministic: the batches
    depend only on the stream, so a stream restarted where a batch began gives the same batches from there.
    `limit` unusable samples while filling one batch (a whole rank share, say) is an error, not a hang."""
    for _ in range(num_batches):
        batch: list[tuple[int, T]] = []
        skipped = 0
        while len(batch) < batch_size:
            i, item = next(stream)
            if item is None:
                skipped += 1
                if skipped >= limit:
                    raise RuntimeError(
                        f"{skipped} unusable samples while filling one batch of {batch_size} (last: index "
                        f"{i}): the data is mostly unusable; check it with `albef-ds data validate`"
                    )
                continue
            batch.append((i, item))
        yield batch, skipped
