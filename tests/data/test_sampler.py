"""sampler.py: the sharded, seeded, resumable epoch sampler and the per-sample seeds."""

from __future__ import annotations

import pytest
import torch

from albef_ds.data import ShardedEpochSampler
from albef_ds.data.sampler import refill_batches, sample_seed


def _shares(
    n: int, ws: int, bs: int, epoch: int = 0, seed: int = 0, drop_last: bool = True
) -> list[list[int]]:
    out = []
    for r in range(ws):
        s = ShardedEpochSampler(n, rank=r, world_size=ws, seed=seed, batch_size=bs, drop_last=drop_last)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


@pytest.mark.parametrize(
    "n, ws, bs, drop_last, total",
    [(50, 3, 4, True, 48), (53, 4, 4, True, 48), (53, 4, 4, False, 52), (10, 1, 3, True, 9)],
)
def test_sampler_ranks_disjoint_and_cover_truncated_epoch(
    n: int, ws: int, bs: int, drop_last: bool, total: int
) -> None:
    shares = _shares(n, ws, bs, drop_last=drop_last)
    flat = [i for s in shares for i in s]
    assert len(flat) == len(set(flat)) == total  # disjoint, no padding duplicates
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:total].tolist()
    assert set(flat) == set(perm)  # union is the truncated epoch
    assert len({len(s) for s in shares}) == 1
    s = ShardedEpochSampler(n, rank=0, world_size=ws, batch_size=bs, drop_last=drop_last)
    assert s.batches_per_epoch == -(-(total // ws) // bs)


def test_sampler_epochs_and_seeds() -> None:
    e0, e0_again, e1 = _shares(40, 2, 4, epoch=0), _shares(40, 2, 4, epoch=0), _shares(40, 2, 4, epoch=1)
    assert e0 == e0_again
    assert e0 != e1
    assert _shares(40, 2, 4, seed=1) != e0


def test_sampler_set_start_skips_batches() -> None:
    s = ShardedEpochSampler(100, rank=1, world_size=2, seed=3, batch_size=8)
    s.set_epoch(2)
    full = list(s)
    assert s.batches_per_epoch == 6 and len(full) == 48
    s.set_start(4)
    assert list(s) == full[32:] and len(s) == 16
    s.set_epoch(2)  # same epoch: the resume point stays
    assert len(s) == 16
    s.set_epoch(3)  # next epoch starts from the beginning
    assert len(s) == 48
    with pytest.raises(ValueError):
        s.set_start(7)


def test_stream_and_refill_batches() -> None:
    s = ShardedEpochSampler(20, rank=1, world_size=2, seed=0, batch_size=3)  # 18 used, 9 per rank
    s.set_epoch(0)
    order = s.rank_indices()
    s.set_start(2, skipped=1)  # 2 batches that read 3 + 3 usable samples and 1 unusable one
    stream = s.stream()
    assert [next(stream) for _ in range(6)] == order[7:] + order[:4]  # on from position 7, then cyclic
    bad = set(order[1::3])
    s.set_start(0)
    items = ((i, None if i in bad else i) for i in s.stream())
    batches = list(refill_batches(items, 3, s.batches_per_epoch, limit=9))
    good = [i for i in order + order if i not in bad]
    assert [[i for i, _ in b] for b, _ in batches] == [good[0:3], good[3:6], good[6:9]]
    assert [k for _, k in batches] == [1, 2, 1]  # unusable samples each batch read
    with pytest.raises(RuntimeError, match="4 unusable samples while filling one batch of 3"):
        list(refill_batches(((i, None) for i in s.stream()), 3, 1, limit=4))
    with pytest.raises(ValueError, match="skipped"):
        s.set_start(1, skipped=-1)


def test_sampler_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="world_size"):
        ShardedEpochSampler(10, world_size=2, batch_size=8)


def test_sample_seed_is_a_function_of_seed_epoch_and_index() -> None:
    s = sample_seed(0, 0, 0)
    assert s == sample_seed(0, 0, 0) and 0 <= s < 2**63
    assert len({s, sample_seed(1, 0, 0), sample_seed(0, 1, 0), sample_seed(0, 0, 1)}) == 4
