"""Learning-rate and alpha schedules, AdamW weight-decay groups, atomic checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from albef_ds.config import load_config
from albef_ds.model import ALBEFPretrain
from albef_ds.train.checkpoint import load_weights
from albef_ds.train.checkpoint.manager import save_consolidated as save_checkpoint
from albef_ds.train.schedule import alpha_at, lr_at, param_groups
from tests.helpers import SPECIAL, tiny_model_config


def test_lr_warmup_then_cosine():
    kw = dict(total_steps=1100, lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=100)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(50, **kw) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(100, **kw) == pytest.approx(1e-4)
    assert lr_at(600, **kw) == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(1100, **kw) == pytest.approx(1e-5)
    assert lr_at(5000, **kw) == pytest.approx(1e-5)  # stays at the floor
    lrs = [lr_at(s, **kw) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_alpha_ramps_over_first_epoch():
    assert alpha_at(0, alpha=0.4, ramp_steps=100) == 0.0
    assert alpha_at(50, alpha=0.4, ramp_steps=100) == pytest.approx(0.2)
    assert alpha_at(100, alpha=0.4, ramp_steps=100) == pytest.approx(0.4)
    assert alpha_at(10_000, alpha=0.4, ramp_steps=100) == pytest.approx(0.4)
    assert alpha_at(0, alpha=0.4, ramp_steps=0) == pytest.approx(0.4)


def test_no_weight_decay_on_biases_and_1d_params():
    m = ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL)
    decay, no_decay = param_groups(m, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.ndim >= 2 and not names[id(p)].endswith(".bias") for p in decay["params"])
    nd_names = {names[id(p)] for p in no_decay["params"]}
    assert "temp" in nd_names and "vision_proj.bias" in nd_names
    assert "text_encoder.bert.embeddings.LayerNorm.weight" in nd_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_checkpoint_is_atomic_and_loads_back(tmp_path, monkeypatch):
    cfg = load_config(None, ["model.queue_size=20"])
    cfg.model = tiny_model_config()
    m = ALBEFPretrain(cfg.model, special_tokens=SPECIAL)
    path = save_checkpoint(tmp_path / "ckpt.pt", m.state_dict(), cfg, step=3)
    good = path.read_bytes()
    # A crash in the middle of the next save leaves the previous checkpoint intact and no stray file.
    with torch.no_grad():
        m.temp.fill_(0.5)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt.pt", m.state_dict(), cfg, step=4)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt.pt"]
    fresh = ALBEFPretrain(cfg.model, special_tokens=SPECIAL)
    report = load_weights(fresh, path)
    assert report.missing == [] and report.unexpected == []
    assert fresh.temp.item() == pytest.approx(0.07)
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 3 and payload["config"]["model"]["queue_size"] == 20


def test_torch_engine_accumulates_gradients_like_one_large_batch():
    from albef_ds.train.engine import TorchEngine

    cfg = load_config(None, ["train.grad_accum=2", "optim.weight_decay=0.0"])
    cfg.model = tiny_model_config(queue_size=0)
    m = ALBEFPretrain(cfg.model, special_tokens=SPECIAL)
    eng = TorchEngine(m, cfg, torch.device("cpu"))
    grads = []
    eng.optimizer.register_step_pre_hook(lambda *_: grads.append(m.vision_proj.weight.grad.clone()))
    w = m.vision_proj.weight
    w0 = w.detach().clone()
    eng.backward((w**2).sum())
    eng.step(last=False)
    assert grads == []  # no optimizer step after the first micro-batch
    eng.backward((3 * w**2).sum())
    eng.step(last=True)
    # Mean of the micro-batch gradients (2w and 6w): what one batch holding both would give.
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], (2 * w0 + 6 * w0) / 2)
    assert not torch.equal(w.detach(), w0)  # the step was applied
    assert m.vision_proj.weight.grad is None  # and the gradients cleared for the next step
