"""The reference losses against values computed by hand (explicit loops over Python floats)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from albef_ds.kernels import ema_update_reference, itc_loss_reference, mlm_loss_reference


def _hand_soft_ce(row_logits: list[float], row_targets: list[float]) -> float:
    m = max(row_logits)
    lse = m + math.log(sum(math.exp(x - m) for x in row_logits))
    return -sum(t * (x - lse) for x, t in zip(row_logits, row_targets))


def _hand_itc_direction(f, fm, bank, temp, alpha):
    b = len(f)
    total = 0.0
    for i in range(b):
        s = [sum(a * c for a, c in zip(f[i], bank[j])) / temp for j in range(len(bank))]
        sm = [sum(a * c for a, c in zip(fm[i], bank[j])) / temp for j in range(len(bank))]
        mx = max(sm)
        e = [math.exp(x - mx) for x in sm]
        z = sum(e)
        tgt = [alpha * v / z + (1 - alpha) * (1.0 if j == i else 0.0) for j, v in enumerate(e)]
        total += _hand_soft_ce(s, tgt)
    return total / b


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("b,q", [(1, 0), (3, 0), (3, 5), (4, 7)])
def test_itc_matches_hand_computation(alpha, b, q):
    d = 6
    fi, ft, fmi, fmt = _unit(b, d), _unit(b, d), _unit(b, d), _unit(b, d)
    qi, qt = _unit(q, d), _unit(q, d)
    bank_i, bank_t = torch.cat([fmi, qi]), torch.cat([fmt, qt])
    temp = 0.07
    got = itc_loss_reference(fi, ft, fmi, fmt, bank_i, bank_t, torch.tensor([temp]), alpha).item()
    want = (
        _hand_itc_direction(fi.tolist(), fmi.tolist(), bank_t.tolist(), temp, alpha)
        + _hand_itc_direction(ft.tolist(), fmt.tolist(), bank_i.tolist(), temp, alpha)
    ) / 2
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_itc_alpha0_is_cross_entropy_over_batch_and_queue():
    b, q, d = 5, 9, 8
    fi, ft, fmi, fmt = _unit(b, d).float(), _unit(b, d).float(), _unit(b, d).float(), _unit(b, d).float()
    bank_i, bank_t = torch.cat([fmi, _unit(q, d).float()]), torch.cat([fmt, _unit(q, d).float()])
    temp = torch.tensor([0.1])
    got = itc_loss_reference(fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.0)
    labels = torch.arange(b)
    want = (
        F.cross_entropy(fi @ bank_t.t() / 0.1, labels) + F.cross_entropy(ft @ bank_i.t() / 0.1, labels)
    ) / 2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_itc_gradients_reach_features_and_temperature_not_targets():
    b, q, d = 4, 6, 8
    fi = _unit(b, d).float().requires_grad_()
    ft = _unit(b, d).float().requires_grad_()
    fmi = _unit(b, d).float().requires_grad_()
    fmt = _unit(b, d).float()
    temp = torch.tensor([0.07], requires_grad=True)
    bank_i, bank_t = torch.cat([fmi.detach(), _unit(q, d).float()]), torch.cat([fmt, _unit(q, d).float()])
    itc_loss_reference(fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.4).backward()
    assert fi.grad is not None and fi.grad.abs().sum() > 0
    assert ft.grad is not None and ft.grad.abs().sum() > 0
    assert temp.grad is not None and temp.grad.abs().item() > 0
    assert fmi.grad is None  # momentum features only shape the targets


def test_mlm_soft_term_is_over_vocabulary_axis():
    k, v = 4, 7
    logits = torch.randn(k, v, dtype=torch.float64)
    labels = torch.tensor([1, -100, 3, 6])
    soft = torch.softmax(torch.randn(k, v, dtype=torch.float64), dim=-1)
    alpha = 0.4
    got = mlm_loss_reference(logits, labels, soft, alpha).item()
    rows = [0, 2, 3]
    hard = sum(
        _hand_soft_ce(logits[r].tolist(), [1.0 if j == labels[r] else 0.0 for j in range(v)]) for r in rows
    )
    soft_term = sum(_hand_soft_ce(logits[r].tolist(), soft[r].tolist()) for r in rows)
    want = (1 - alpha) * hard / 3 + alpha * soft_term / 3
    assert got == pytest.approx(want, rel=1e-6)
    # The pre-March-2022 reference took the softmax over the wrong axis; that gives a different number.
    wrong = -(soft * F.log_softmax(logits, dim=0)).sum(-1)[rows].mean().item()
    assert abs(((1 - alpha) * hard / 3 + alpha * wrong) - got) > 1e-3


def test_mlm_alpha0_is_plain_cross_entropy_and_empty_is_zero():
    logits = torch.randn(6, 11)
    labels = torch.tensor([2, -100, 5, 0, -100, 10])
    soft = torch.softmax(torch.randn(6, 11), -1)
    torch.testing.assert_close(
        mlm_loss_reference(logits, labels, soft, 0.0), F.cross_entropy(logits, labels, ignore_index=-100)
    )
    none = mlm_loss_reference(logits.requires_grad_(), torch.full((6,), -100), soft, 0.4)
    assert none.item() == 0.0
    none.backward()  # still differentiable


def test_ema_arithmetic_with_fp32_momentum_and_bf16_online():
    m = 0.995
    pm = [torch.randn(5, 3), torch.randn(7)]
    p = [torch.randn(5, 3).bfloat16(), torch.randn(7).bfloat16()]
    expect = [m * a + (1 - m) * b.float() for a, b in zip(pm, p)]
    ema_update_reference(pm, p, m)
    for a, e in zip(pm, expect):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_reference(pm, p[:1], m)
