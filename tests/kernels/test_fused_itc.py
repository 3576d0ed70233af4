"""The fused ITC loss against `itc_loss_reference`: forward and every gradient the model uses (both online
features and the temperature).

On CPU the Triton kernels run in Triton's interpreter; under the `gpu` marker they run compiled. Triton
chooses between the two once, when it is first imported (it decorates its own tl.sum, tl.zeros, ... then):
this module turns the interpreter on when nothing has imported triton yet and there is no GPU (running
tests/kernels alone). In a full run something earlier (timm) has imported triton compiled; the interpreted
tests then skip here and `test_interpreted_cases_in_a_fresh_process` runs this file again in a process
started with TRITON_INTERPRET=1.
Once set, the variable stays set for the rest of the session (Triton reads it again when it lazily imports
its own submodules, so it cannot be removed after the import); on CPU nothing else runs Triton kernels.

Sweep: B in {1, 3, 64}, D in {32, 100, 256}, Q in {0, 17, 1000, 4096}, alpha in {0, 0.4}, temperature in
{0.02, 0.07, 0.5}, features fp32 or bf16. The full grid (432 cases) takes about 140 s in the interpreter on
2 cores (run it with ALBEF_KERNEL_FULL_SWEEP=1), too much of the CI budget, so by default the CPU test
covers it with an all-pairs design (every value of every pair of axes appears together in at least one
case; built greedily below, cheapest cases first: 15 cases) plus corner cases (a single candidate,
large logits, bank splits and tile sizes of the compiled configuration, bf16 banks, 0-dim temperature,
non-contiguous features). The GPU test runs the full grid and Q = 262,144.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton (see the module docstring)

import torch.nn.functional as F  # noqa: E402
from albef_ds.kernels import itc_loss_fused, itc_loss_reference  # noqa: E402
from albef_ds.kernels.itc import interpreter_active, triton_available  # noqa: E402

from albef_ds import kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
INTERPRETING = interpreter_active()
SKIP_REASON = (
    "Triton's interpreter is off in this process; test_interpreted_cases_in_a_fresh_process runs these"
)
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason=SKIP_REASON)
ROOT = Path(__file__).resolve().parents[2]

AXES = {
    "b": [1, 3, 64],
    "d": [32, 100, 256],
    "q": [0, 17, 1000, 4096],
    "alpha": [0.0, 0.4],
    "temp": [0.02, 0.07, 0.5],
    "dtype": [torch.float32, torch.bfloat16],
}
# Per-dtype tolerances. Both sides compute in fp32 from the same inputs (bf16 x bf16 products are exact in
# fp32), so they differ by summation order only; bf16 gradients are then rounded to bf16 (2^-8 relative).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-5, atol=1e-5)}
GRAD_REL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}


def _cost(case: dict) -> int:
    return case["b"] * case["d"] * (case["b"] + case["q"])


def all_pairs(axes: dict) -> list[dict]:
    """Greedy all-pairs design: repeatedly take the grid point covering the most uncovered value pairs
    (ties: the cheapest), until every pair of values of every two axes occurs in some case."""
    names = list(axes)
    grid = [dict(zip(names, vals)) for vals in itertools.product(*axes.values())]
    axis_pairs = list(itertools.combinations(names, 2))

    def pairs(c):
        return {(a, repr(c[a]), b, repr(c[b])) for a, b in axis_pairs}

    uncovered = set().union(*(pairs(c) for c in grid))
    chosen = []
    while uncovered:
        best = max(grid, key=lambda c: (len(pairs(c) & uncovered), -_cost(c)))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


PAIRWISE = all_pairs(AXES)


def _unit(*shape, dtype=torch.float32, device="cpu"):
    return F.normalize(torch.randn(*shape), dim=-1).to(device=device, dtype=dtype)


def _inputs(b, d, q, dtype, device, bank_dtype=torch.float32):
    """Like the model: bf16 features may meet fp32 banks = [momentum batch upcast; fp32 queue]."""
    fi, ft, fmi, fmt = (_unit(b, d, dtype=dtype, device=device) for _ in range(4))
    bank_i = torch.cat([fmi.to(bank_dtype), _unit(q, d, dtype=bank_dtype, device=device)])
    bank_t = torch.cat([fmt.to(bank_dtype), _unit(q, d, dtype=bank_dtype, device=device)])
    return fi, ft, fmi, fmt, bank_i, bank_t


def _run(fn, fi, ft, fmi, fmt, bank_i, bank_t, temp, alpha, **kw):
    fi, ft = fi.detach().clone().requires_grad_(), ft.detach().clone().requires_grad_()
    temp = temp.detach().clone().requires_grad_()
    loss = fn(fi, ft, fmi, fmt, bank_i, bank_t, temp, alpha, **kw)
    loss.backward()
    return loss.detach(), fi.grad, ft.grad, temp.grad


def check_case(
    b, d, q, alpha, temp, dtype, device, *, bank_dtype=torch.float32, temp_shape=(1,), temp_dtype=None, **kw
):
    args = _inputs(b, d, q, dtype, device, bank_dtype)
    t = torch.full(temp_shape, temp, device=device, dtype=temp_dtype or torch.float32)
    temp = t.float().item()  # the value actually used (a bf16 temperature is rounded)
    want = _run(itc_loss_reference, *args, t, alpha)
    got = _run(itc_loss_fused, *args, t, alpha, **kw)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    torch.testing.assert_close(got[0], want[0], **TOL[dtype])
    for name, g, w in zip(("image_feat", "text_feat", "temp"), got[1:], want[1:]):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        # Absolute floor from the size of the terms that cancel: s ~ 1/T, and dL/dT sums s/T ~ 1/T^2 (exact
        # zeros such as a single candidate come out as rounding noise of that size).
        floor = 2e-6 / temp**2 if name == "temp" else 1e-6 / temp
        rel = GRAD_REL[dtype] if name != "temp" else GRAD_REL[torch.float32]
        scale = w.float().abs().max().item()
        torch.testing.assert_close(g.float(), w.float(), rtol=rel, atol=rel * scale + floor, msg=name)


@pytest.fixture
def interpret():
    if not INTERPRETING:
        pytest.skip(SKIP_REASON)


def run_file_interpreted(path: Path) -> None:
    """Run a test file in a fresh process with Triton's interpreter on; fail if any of its interpreted
    tests failed or skipped."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(path), "-q", "-rs", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, out
    assert SKIP_REASON not in r.stdout, out


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available(), reason="interpreted in this process, or GPU")
def test_interpreted_cases_in_a_fresh_process():
    run_file_interpreted(Path(__file__))


def test_pairwise_design_covers_every_pair_and_every_value():
    names = list(AXES)
    for a, b in itertools.combinations(names, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in PAIRWISE}
        assert len(seen) == len(AXES[a]) * len(AXES[b]), (a, b)
    assert len(PAIRWISE) < 30  # far below the 432 of the full grid


@pytest.mark.parametrize("case", PAIRWISE, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fused_matches_reference_pairwise(interpret, case):
    check_case(**case, device="cpu")


@pytest.mark.parametrize(
    "b,d,q,alpha,temp,kw",
    [
        (1, 32, 0, 0.4, 0.07, {}),  # a single candidate: loss 0, gradients 0
        (64, 32, 0, 0.4, 0.07, {}),  # no queue: in-batch only
        (33, 48, 200, 0.4, 0.01, {}),  # logits up to 100: the online log-sum-exp must not overflow
        (40, 100, 1000, 0.4, 0.07, {"block_n": 64}),  # the compiled tile size, several row blocks
        (5, 24, 700, 0.4, 0.07, {"block_n": 16, "splits": 1}),  # one chunk of many tiles
        (5, 24, 700, 1.0, 0.07, {"block_n": 32, "splits": 1000}),  # more splits asked than tiles
        (3, 20, 17, 0.4, 0.1, {"temp_shape": ()}),  # 0-dim temperature
    ],
)
def test_fused_corner_cases(interpret, b, d, q, alpha, temp, kw):
    check_case(b, d, q, alpha, temp, torch.float32, "cpu", **kw)


@pytest.mark.parametrize("feat_dtype", [torch.float32, torch.bfloat16])
def test_fused_bf16_banks(interpret, feat_dtype):
    check_case(8, 64, 100, 0.4, 0.07, feat_dtype, "cpu", bank_dtype=torch.bfloat16)


def test_fused_bf16_temperature(interpret):
    # DeepSpeed's bf16 mode casts the temperature parameter too; its gradient comes back in bf16.
    check_case(8, 64, 100, 0.4, 0.07, torch.bfloat16, "cpu", temp_dtype=torch.bfloat16)


def test_fused_non_contiguous_features(interpret):
    b, d, q = 6, 40, 30
    fi, ft, fmi, fmt, bank_i, bank_t = _inputs(b, d, q, torch.float32, "cpu")
    # Transposed storage: same values, strides (1, B).
    fi_nc, ft_nc = fi.t().contiguous().t(), ft.t().contiguous().t()
    assert not fi_nc.is_contiguous()
    temp = torch.tensor([0.07])
    want = _run(itc_loss_reference, fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.4)
    got = _run(itc_loss_fused, fi_nc, ft_nc, fmi, fmt, bank_i, bank_t, temp, 0.4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_fused_gives_no_gradient_to_targets_and_refuses_a_bank_with_grad(interpret):
    fi, ft, fmi, fmt, bank_i, bank_t = _inputs(4, 16, 8, torch.float32, "cpu")
    fmi.requires_grad_()
    temp = torch.tensor([0.07], requires_grad=True)
    itc_loss_fused(fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.4).backward()
    assert fmi.grad is None and temp.grad is not None
    with pytest.raises(ValueError, match="text_bank requires grad"):
        itc_loss_fused(fi, ft, fmi, fmt, bank_i, bank_t.requires_grad_(), temp, 0.4)
    with torch.no_grad():  # fine without autograd (evaluation)
        itc_loss_fused(fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.4)


def test_fused_rejects_bad_shapes(interpret):
    fi, ft, fmi, fmt, bank_i, bank_t = _inputs(4, 16, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="bank must be"):
        itc_loss_fused(fi, ft, fmi, fmt, bank_i[:, :8], bank_t, torch.tensor([0.07]), 0.4)


# ---------------------------------------------------------------------------------------------- dispatch
def test_auto_picks_reference_on_cpu(monkeypatch):
    x = torch.zeros(2, 4)
    monkeypatch.setenv("ALBEF_KERNELS", "auto")
    assert not kernels.use_fused(x)
    fi, ft, fmi, fmt, bank_i, bank_t = _inputs(3, 8, 5, torch.float32, "cpu")
    temp = torch.tensor([0.07])
    want = itc_loss_reference(fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.4)
    assert torch.equal(kernels.itc_loss(fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.4), want)
    monkeypatch.setenv("ALBEF_KERNELS", "reference")
    assert not kernels.use_fused(x)
    monkeypatch.setenv("ALBEF_KERNELS", "fused")
    assert kernels.use_fused(x)
    monkeypatch.setenv("ALBEF_KERNELS", "fast")
    with pytest.raises(ValueError, match="ALBEF_KERNELS must be one of"):
        kernels.use_fused(x)


def test_forced_fused_runs_interpreted(interpret, monkeypatch):
    monkeypatch.setenv("ALBEF_KERNELS", "fused")
    fi, ft, fmi, fmt, bank_i, bank_t = _inputs(3, 8, 5, torch.float32, "cpu")
    temp = torch.tensor([0.07])
    want = itc_loss_reference(fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.4)
    torch.testing.assert_close(kernels.itc_loss(fi, ft, fmi, fmt, bank_i, bank_t, temp, 0.4), want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_forced_fused_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from albef_ds import kernels\n"
        "x = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)\n"
        "try:\n"
        "    kernels.itc_loss(x, x, x, x, x, x, torch.tensor([0.07]), 0.4)\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ALBEF_KERNELS"] = "fused"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "ERROR: the fused ITC loss runs on CUDA tensors" in r.stdout and "ALBEF_KERNELS" in r.stdout, (
        r.stdout
    )


# ---------------------------------------------------------------------------------------------- GPU
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# The compiled kernels under the `gpu` marker: the full grid, and queues up to 262,144.


FULL_SWEEP_CPU = os.environ.get("ALBEF_KERNEL_FULL_SWEEP", "0") == "1"


@pytest.mark.parametrize("dtype", AXES["dtype"])
@pytest.mark.parametrize("b", AXES["b"])
@pytest.mark.parametrize("d", AXES["d"])
@pytest.mark.parametrize("q", AXES["q"])
@pytest.mark.parametrize("alpha", AXES["alpha"])
@pytest.mark.parametrize("temp", AXES["temp"])
@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cuda", marks=gpu),
        # The whole grid interpreted: 432 cases, about 140 s on 2 cores; opt-in (ALBEF_KERNEL_FULL_SWEEP=1).
        pytest.param(
            "cpu",
            marks=pytest.mark.skipif(
                not (FULL_SWEEP_CPU and INTERPRETING), reason="set ALBEF_KERNEL_FULL_SWEEP=1 (interpreter)"
            ),
        ),
    ],
)
def test_fused_matches_reference_full_grid(device, b, d, q, alpha, temp, dtype):
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference in full fp32
    check_case(b, d, q, alpha, temp, dtype, device)


@pytest.mark.parametrize("b,q", [(1, 262144), (64, 262144), (256, 65536)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_large_queue_gpu(b, q):
    torch.backends.cuda.matmul.allow_tf32 = False
    check_case(b, 256, q, 0.4, 0.07, torch.bfloat16, "cuda")
