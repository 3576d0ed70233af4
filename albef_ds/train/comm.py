"""The one padded all-gather: ranks holding different numbers of rows, one collective.

`all_gather` needs equal shapes on every rank, but a rank may hold fewer rows than the others (a batch that
dropped undecodable images, an evaluation share of a split that does not divide). Each rank pads its rows to
`max_rows` and one all_gather moves every block; callers then cut the padding: evaluation with the counts it
knows on every rank (`gather_rows`), the feature queue with a validity column so that no host sync is needed
(`make_queue_gather`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gather_padded(x: torch.Tensor, max_rows: int) -> list[torch.Tensor]:
    """Every rank's x (rows along dim 0, at most max_rows) padded with zeros to max_rows, in rank order."""
    import torch.distributed as dist

    n = x.shape[0]
    if n > max_rows:
        raise ValueError(f"padded all-gather got {n} rows, more than the {max_rows} it was sized for")
    padded = x.new_zeros((max_rows, *x.shape[1:]))
    padded[:n] = x
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    return parts


def gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order, counts[r] being the rows of rank r (known to every rank):
    each row exactly once."""
    m = max(counts)
    if m == 0:
        return x
    return torch.cat([p[:c] for p, c in zip(gather_padded(x.contiguous(), m), counts)])


def make_queue_gather(max_rows: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The queue's gather: (B, D) rows with B <= max_rows per rank -> (rows (W x max_rows, D), valid
    (W x max_rows,) bool). The validity travels as an extra column of the same collective, so the model's
    enqueue leaves the padded rows out on the device, without a host sync."""

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = x.shape[1]
        flagged = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        rows = torch.cat(gather_padded(flagged, max_rows))
        return rows[:, :d], rows[:, d] > 0

    return gather


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable value of ours) on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj` in rank order."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
