"""`albef-ds export` on single-process checkpoints and on bad input (the DeepSpeed case is tested on the
2-rank run in test_deepspeed_2rank.py against DeepSpeed's own zero_to_fp32)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from albef_ds.cli import main
from albef_ds.config import load_config
from albef_ds.model import ALBEFPretrain
from albef_ds.train.checkpoint import export_weights, load_weights
from albef_ds.train.checkpoint.manager import save_consolidated as save_checkpoint
from tests.helpers import SPECIAL, tiny_model_config


@pytest.fixture
def ckpt(tmp_path):
    cfg = load_config(None, [])
    cfg.model = tiny_model_config()
    torch.manual_seed(3)
    m = ALBEFPretrain(cfg.model, special_tokens=SPECIAL)
    with torch.no_grad():
        m.image_queue.normal_()  # non-trivial buffers: they must survive (no transposition on reload)
        m.queue_ptr.fill_(7)
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", m.state_dict(), cfg, step=12)
    return cfg, m, path


def test_export_round_trips_into_a_fresh_model(ckpt, tmp_path):
    cfg, m, path = ckpt
    out = tmp_path / "w.safetensors"
    summary = export_weights(path.parent, out)  # a run folder without checkpoints/: its checkpoint.pt
    assert summary["step"] == "12" and summary["tensors"] == len(m.state_dict())
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["albef_ds_format"] == "1" and "model" in meta["config"]
    fresh = ALBEFPretrain(cfg.model, special_tokens=SPECIAL)
    report = load_weights(fresh, out)
    assert not report.missing and not report.unexpected and not report.converted
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_bad_sources_are_clear_errors(ckpt, tmp_path, capsys):
    _, _, path = ckpt
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_weights(tmp_path / "nope", tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_weights(path, tmp_path / "w.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        export_weights(empty, tmp_path / "w.safetensors")
    # A folder posing as DeepSpeed whose model-state file is something else.
    ds = tmp_path / "ds"
    ds.mkdir()
    shutil.copy(path, ds / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="no 'module' entry; not a DeepSpeed model-state file"):
        export_weights(ds, tmp_path / "w.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["export", str(junk), "-o", str(tmp_path / "w.safetensors")]) == 2
    assert "junk.pt is not a loadable checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()
