"""How evaluation splits work over ranks, and the one collective it needs (gather rows of known counts).

Evaluation code takes a `Comm`: `LocalComm` for one process, `ProcessGroupComm` over an initialised
torch.distributed group (formed by `albef_ds.train.engine.init_distributed`), gathering through the
runtime's one padded all-gather (`albef_ds.train.comm`). Shards are contiguous and
their sizes follow from (n, world_size, align) alone, so no rank ever needs to ask another for a count,
and no sample is padded in or duplicated (the reference's padded samplers double-count).
"""

from __future__ import annotations

import torch


def shard_bounds(n: int, world_size: int, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous [start, end) shares of range(n) for each rank, cut at multiples of `align`.

    The n items form ceil(n / align) blocks of `align` (the last may be shorter); ranks get whole blocks,
    as evenly as possible, earlier ranks one more when they do not divide. Cutting at multiples of the
    batch size means every rank's batches are exactly the batches one process would form, so a
    distributed evaluation computes bit-for-bit what a single process computes. A rank may get nothing.
    """
    if n < 0 or world_size < 1 or align < 1:
        raise ValueError(f"need n >= 0, world_size >= 1, align >= 1; got {n}, {world_size}, {align}")
    blocks = -(-n // align)
    base, extra = divmod(blocks, world_size)
    out, b = [], 0
    for r in range(world_size):
        nb = base + (1 if r < extra else 0)
        out.append((min(b * align, n), min((b + nb) * align, n)))
        b += nb
    return out


class LocalComm:
    """One process: the local share is everything and gathering is the identity."""

    rank = 0
    world_size = 1

    def gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if counts != [x.shape[0]]:
            raise ValueError(f"one process holds {x.shape[0]} rows but counts are {counts}")
        return x

    def barrier(self) -> None:
        pass


class ProcessGroupComm:
    """Over the default torch.distributed group (gloo on CPU, NCCL on GPUs)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupComm needs an initialised torch.distributed process group")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's rows in rank order. counts[r] = rows rank r holds (known to all ranks,
        see `shard_bounds`); the one padded all-gather of the runtime (`albef_ds.train.comm`) moves them and
        the padding is cut off again, so the result holds each row exactly once, on x's device."""
        from ..train.comm import gather_rows

        if len(counts) != self.world_size or counts[self.rank] != x.shape[0]:
            raise ValueError(f"rank {self.rank} holds {x.shape[0]} rows but counts are {counts}")
        return gather_rows(x, counts)

    def barrier(self) -> None:
        self._dist.barrier()


def default_comm():
    """ProcessGroupComm when a process group of more than one rank exists, else LocalComm."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupComm()
    return LocalComm()
