"""The tiny ALBEF with ALBEF_KERNELS=fused (Triton kernels, interpreted on CPU) against
ALBEF_KERNELS=reference: one forward/backward (losses and every parameter gradient), and a few training
steps (EMA + forward + backward + AdamW + enqueue, the trainer's order) with the same per-step losses.

See test_fused_itc.py for how the interpreter is switched on and the fresh-process fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton

from albef_ds.kernels.itc import interpreter_active, triton_available  # noqa: E402

from albef_ds.model import ALBEFPretrain  # noqa: E402
from albef_ds.train.schedule import param_groups  # noqa: E402
from tests.helpers import SPECIAL, tiny_model_config  # noqa: E402

INTERPRETING = interpreter_active()
SKIP_REASON = (
    "Triton's interpreter is off in this process; test_interpreted_cases_in_a_fresh_process runs these"
)
needs_interpreter = pytest.mark.skipif(not (triton_available() and INTERPRETING), reason=SKIP_REASON)
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available() or not triton_available(), reason="not needed")
def test_interpreted_cases_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-rs", "-p", "no:cacheprovider"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, out
    assert SKIP_REASON not in r.stdout, out


def _batch(b=4, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (b, length), generator=g)
    ids[:, 0] = SPECIAL["cls"]
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 9:] = 0  # some padding
    ids[0, 9:] = SPECIAL["pad"]
    return image, ids, mask


def _model():
    torch.manual_seed(0)
    return ALBEFPretrain(tiny_model_config(queue_size=40), special_tokens=SPECIAL)


@needs_interpreter
def test_forward_backward_fused_matches_reference(monkeypatch):
    image, ids, mask = _batch()
    results = {}
    for mode in ("reference", "fused"):
        monkeypatch.setenv("ALBEF_KERNELS", mode)
        model = _model()
        torch.manual_seed(5)  # the same masking and hard negatives both times
        out = model(image, ids, mask, alpha=0.4)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = (out, grads)
    (ref, gref), (fus, gfus) = results["reference"], results["fused"]
    for name in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        torch.testing.assert_close(getattr(fus, name), getattr(ref, name), rtol=1e-5, atol=1e-6, msg=name)
    assert gref.keys() == gfus.keys() and "temp" in gref
    for n in gref:
        # Rounding differences of ~1e-7 in the ITC gradient grow through 4-6 layers of backward; a wrong
        # gradient would be off by its own size. The parameters next to the loss are held tighter.
        tight = n.startswith(("temp", "vision_proj", "text_proj"))
        tol = dict(rtol=1e-5, atol=1e-6) if tight else dict(rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(gfus[n], gref[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


@needs_interpreter
def test_training_steps_fused_match_reference(monkeypatch):
    steps = 6
    batches = [_batch(seed=s) for s in range(steps)]
    losses = {}
    for mode in ("reference", "fused"):
        monkeypatch.setenv("ALBEF_KERNELS", mode)
        model = _model()
        model.copy_params()
        opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-3)
        torch.manual_seed(7)
        per_step = []
        for image, ids, mask in batches:
            model.momentum_update()  # the fused EMA under "fused"
            out = model(image, ids, mask, alpha=0.4)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            model.enqueue(out.image_feat_m, out.text_feat_m)
            per_step.append([out.loss_itc.item(), out.loss.item()])
        losses[mode] = torch.tensor(per_step)
    # Steps 2.. see the EMA, the queue and AdamW moves of earlier steps: the losses follow each other.
    torch.testing.assert_close(losses["fused"], losses["reference"], rtol=1e-4, atol=1e-5)
    assert not torch.equal(losses["reference"][0], losses["reference"][-1])  # it did train
