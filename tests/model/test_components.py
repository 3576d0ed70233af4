"""The reusable model parts: the feature queue, the momentum pairs, the execution ops and the sections hook,
and the flat state-dict layout that the composed task modules keep."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch import nn

from albef_ds.bench.recipes import recipe_ops, reference_ops, sample_hard_negatives_looped
from albef_ds.model import (
    NO_ID,
    SECTION_NAMES,
    ALBEFPretrain,
    FeatureQueue,
    MomentumPairs,
    PretrainOps,
    build_encoders,
)
from albef_ds.model.losses import sample_hard_negatives
from albef_ds.model.retrieval import ALBEFRetrieval
from tests.helpers import SPECIAL, tiny_model_config


def _host_with_queue(size=5, dim=2, **kw):
    host = nn.Module()
    return host, FeatureQueue(host, size=size, dim=dim, seed=0, **kw)


# ---------------------------------------------------------------- feature queue
def test_queue_registers_flat_buffers_on_its_host():
    host, q = _host_with_queue(size=6, dim=3, id_columns=("idx_queue",))
    assert list(host.state_dict()) == ["image_queue", "text_queue", "queue_ptr", "idx_queue"]
    assert host.image_queue.shape == (6, 3) and host.idx_queue.tolist() == [NO_ID] * 6
    torch.testing.assert_close(host.image_queue.norm(dim=1), torch.ones(6))  # unit rows
    host.double()  # replaces the host's buffers: the queue follows them
    q.enqueue(torch.ones(1, 3), torch.ones(1, 3), torch.tensor([4]))
    assert host.image_queue.dtype == torch.float64 and host.image_queue[0].tolist() == [1.0] * 3
    assert host.idx_queue[0] == 4


def test_queue_wraps_around():
    host, q = _host_with_queue(size=5, dim=2)
    host.queue_ptr.fill_(3)
    rows = torch.arange(8.0).reshape(4, 2)
    q.enqueue(rows, -rows)
    assert int(host.queue_ptr) == (3 + 4) % 5
    for i, slot in enumerate([3, 4, 0, 1]):
        assert host.image_queue[slot].tolist() == rows[i].tolist()
        assert host.text_queue[slot].tolist() == (-rows[i]).tolist()


def test_masked_write_takes_exactly_the_valid_rows_in_order():
    host, q = _host_with_queue(size=6, dim=2, id_columns=("idx_queue",))
    host.queue_ptr.fill_(4)
    before = host.image_queue.clone()
    rows = torch.arange(10.0).reshape(5, 2)
    valid = torch.tensor([False, True, False, True, True])
    q.all_gather = lambda x: (x, valid)  # a padded gather: rows 0 and 2 are padding
    q.enqueue(rows, rows + 100, torch.tensor([10, 11, 12, 13, 14]))
    assert int(host.queue_ptr) == (4 + 3) % 6
    written = [4, 5, 0]  # the three valid rows, in order, from the pointer on
    for slot, r in zip(written, [1, 3, 4]):
        assert host.image_queue[slot].tolist() == rows[r].tolist()
        assert host.text_queue[slot].tolist() == (rows[r] + 100).tolist()
    assert host.idx_queue.tolist() == [14, NO_ID, NO_ID, NO_ID, 11, 13]
    untouched = [s for s in range(6) if s not in written]
    assert torch.equal(host.image_queue[untouched], before[untouched])


def test_queue_id_column_round_trips_through_the_gather_and_size_zero_is_a_no_op():
    calls = []

    def gather(x):
        calls.append(tuple(x.shape))
        return torch.cat([x, x])  # two ranks holding the same rows

    host, q = _host_with_queue(size=4, dim=3, id_columns=("idx_queue",), all_gather=gather)
    q.enqueue(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([2**24 - 1, 7]))
    assert calls == [(2, 7)]  # image | text | id in one collective
    assert host.idx_queue.tolist() == [2**24 - 1, 7, 2**24 - 1, 7] and host.idx_queue.dtype == torch.long
    with pytest.raises(ValueError, match="id tensor"):
        q.enqueue(torch.zeros(2, 3), torch.zeros(2, 3))
    host0, q0 = _host_with_queue(size=0, dim=3, all_gather=gather)
    q0.enqueue(torch.zeros(2, 3), torch.zeros(2, 3))
    assert calls == [(2, 7)] and int(host0.queue_ptr) == 0  # no collective for an empty queue


# ---------------------------------------------------------------- momentum
def _host_with_momentum(m=0.9):
    torch.manual_seed(0)
    host = nn.Module()
    host.a = nn.Linear(3, 2)
    host.b = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    return host, MomentumPairs(host, ("a", "b"), m)


def test_momentum_copies_are_buffers_under_suffixed_names():
    host, mp = _host_with_momentum()
    assert [n for n, _ in host.named_parameters()] == [
        "a.weight",
        "a.bias",
        "b.0.weight",
        "b.0.bias",
        "b.1.weight",
        "b.1.bias",
    ]
    assert sorted(n for n, _ in host.named_buffers()) == sorted(
        ["a_m.weight", "a_m.bias", "b_m.0.weight", "b_m.0.bias", "b_m.1.weight", "b_m.1.bias"]
    )
    moms, onlines = mp.pairs()
    assert len(moms) == len(onlines) == 6 and all(not b.requires_grad for b in moms)
    assert all(torch.equal(b, p) for b, p in zip(moms, onlines))


def test_momentum_update_is_the_hand_computed_lerp_and_copy_params_resets():
    host, mp = _host_with_momentum(m=0.9)
    with torch.no_grad():
        for p in host.parameters():
            p.add_(torch.randn_like(p))
    moms, onlines = mp.pairs()
    before = [b.clone() for b in moms]
    mp.update()
    for b0, b1, p in zip(before, moms, onlines):
        torch.testing.assert_close(b1, 0.9 * b0 + 0.1 * p.detach(), rtol=0, atol=1e-6)
    calls = []
    mp.update(lambda ms, os_, m: calls.append((len(ms), len(os_), m)))  # a swapped-in EMA gets every pair
    assert calls == [(6, 6, 0.9)]
    mp.copy_params()
    assert all(torch.equal(b, p) for b, p in zip(*mp.pairs()))


# ---------------------------------------------------------------- the composed models
def test_encoders_are_registered_in_parameter_order():
    parts = build_encoders(tiny_model_config(), mlm_head=False)
    assert list(parts) == ["visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head", "temp"]
    assert not hasattr(parts["text_encoder"], "cls") and parts["temp"].shape == (1,)


def test_state_dict_stays_flat_in_the_reference_names():
    pre = ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL)
    ret = ALBEFRetrieval(tiny_model_config(), special_tokens=SPECIAL)
    top = {
        "visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head", "temp",
        "visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m",
        "image_queue", "text_queue", "queue_ptr",
    }  # fmt: skip
    assert {k.split(".")[0] for k in pre.state_dict()} == top
    assert {k.split(".")[0] for k in ret.state_dict()} == top | {"idx_queue"}
    assert any(k.startswith("text_encoder.cls.") for k in pre.state_dict())
    assert {k for k in pre.state_dict() if ".cls." not in k} | {"idx_queue"} == set(ret.state_dict())
    # Parameters in the same order in both (optimizer states and DeepSpeed checkpoints record positions).
    names = [n for n, _ in pre.named_parameters() if ".cls." not in n]
    assert names == [n for n, _ in ret.named_parameters()]
    assert names[0] == "temp" and names[1].startswith("visual_encoder.")  # the host's own, then its parts


def _batch(b=4, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (b, length), generator=g)
    ids[:, 0] = SPECIAL["cls"]
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 9:], ids[0, 9:] = 0, SPECIAL["pad"]
    return image, ids, mask


def _losses(ops: PretrainOps, steps: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    model = ALBEFPretrain(tiny_model_config(queue_size=10), special_tokens=SPECIAL, ops=ops)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(7)  # the same masking (and, with the same sampler, the same negatives)
    out_losses = []
    for s in range(steps):
        model.momentum_update()
        out = model(*_batch(seed=s), alpha=0.4)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.enqueue(out.image_feat_m, out.text_feat_m)
        out_losses.append(torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_mlm]).detach())
    return torch.stack(out_losses)


def test_reference_ops_compute_the_same_losses_as_ours():
    """Per-tensor EMA, unfused ITC, full-sequence MLM head: the same math in fp32. The looped sampler draws
    from the same distribution with other random numbers, so it is swapped for ours here (and checked for
    its distribution below)."""
    ref = dataclasses.replace(reference_ops(), sample_hard_negatives=sample_hard_negatives)
    torch.testing.assert_close(_losses(ref), _losses(PretrainOps()), rtol=1e-5, atol=1e-6)
    assert recipe_ops("reference").mlm_head_positions == "all" and recipe_ops("ours") == PretrainOps()
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_ops("fast")
    with pytest.raises(ValueError, match="mlm_head_positions"):
        PretrainOps(mlm_head_positions="some")


def test_looped_sampler_never_draws_the_positive_and_follows_softmax():
    b, reps = 4, 3000
    sim = torch.randn(b, b)
    torch.manual_seed(2)
    counts = torch.zeros(b, b)
    for _ in range(reps):
        counts[torch.arange(b), sample_hard_negatives_looped(sim)] += 1
    assert counts.diagonal().sum() == 0
    probs = sim.clone().fill_diagonal_(float("-inf")).softmax(dim=1)
    assert (counts / reps - probs).abs().max() < 0.05


def test_sections_hook_is_entered_around_each_part_in_order():
    entered = []

    @contextlib.contextmanager
    def sections(name):
        entered.append(name)
        yield

    model = ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL, sections=sections)
    model(*_batch(), alpha=0.4)
    assert entered == list(SECTION_NAMES) == ["online_forward", "momentum_forward", "itc", "itm", "mlm"]
    model.sections = None  # settable, and off by default
    model(*_batch(), alpha=0.4)
    assert len(entered) == len(SECTION_NAMES)
