"""Sample order and per-sample seeds, shared by every loader backend (torch reference and DALI).

`ShardedEpochSampler` decides which indices a rank sees, in which order, and where a resumed epoch
restarts; `sample_seed` gives each (seed, epoch, index) its own RNG seed, so a sample's augmentation depends
on nothing else (not the number of workers, not the resume point, not the backend's threading).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


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
        self._on_set_epoch = on_set_epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a full epoch (ignores set_start)."""
        return -(-self.per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch
        if self._on_set_epoch is not None:
            self._on_set_epoch(epoch)

    def set_start(self, batches_done: int) -> None:
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done must lie in [0, {self.batches_per_epoch}], got {batches_done}")
        self.start_batch = batches_done

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
