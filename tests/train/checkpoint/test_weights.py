"""`load_weights` / `init_weights` from every source users have: our files and folders, released ALBEF
checkpoints, DeiT files, bert-base-uncased folders; and the errors for sources that are none of these.
(The conversions themselves are tested in tests/model/test_weights.py; DeepSpeed folders on the real 2-rank
run in tests/train/test_deepspeed_2rank.py.)"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from albef_ds.config import config_to_dict, load_config
from albef_ds.model import ALBEFPretrain
from albef_ds.train.checkpoint import (
    export_weights,
    init_weights,
    load_weights,
    publish,
    resolve_source,
    step_tag,
)
from albef_ds.train.checkpoint.manager import save_consolidated
from albef_ds.train.engine import TorchEngine
from tests.helpers import SPECIAL, tiny_model_config
from tests.model.test_weights import (
    _deit_state,
    bert_pretraining_state,
    check_bert_loaded,
    check_deit_loaded,
    check_released_loaded,
    old_bert_state,
    released_pretraining_model,
)


def _model() -> ALBEFPretrain:
    return ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL).eval()


def _trained_looking(seed: int) -> ALBEFPretrain:
    """A model whose every tensor differs from a fresh one (buffers, pointer and temperature included)."""
    torch.manual_seed(seed)
    m = _model()
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
        m.temp.fill_(0.05)
        m.queue_ptr.fill_(7)
    return m


def _assert_same(model, want: dict) -> None:
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.fixture
def sources(tmp_path):
    """One tiny model saved as each of our sources (name -> path), and its state dict."""
    cfg = load_config(None, [])
    cfg.model = tiny_model_config()
    m = _trained_looking(1)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    out = {}
    # Consolidated weights at the end of a run (a run folder without checkpoints/: its checkpoint.pt).
    out["checkpoint.pt"] = save_consolidated(tmp_path / "run_a" / "checkpoint.pt", sd, cfg, step=12)
    out["run folder (checkpoint.pt)"] = tmp_path / "run_a"
    out["checkpoint_best.pt"] = save_consolidated(tmp_path / "ft" / "checkpoint_best.pt", sd, cfg, step=3)
    out["exported .safetensors"] = tmp_path / "w.safetensors"
    export_weights(out["checkpoint.pt"], out["exported .safetensors"])
    # A real 1-process torch-engine checkpoint, published; the run folder also holds an older checkpoint.pt
    # of other weights, which its checkpoints/latest takes precedence over.
    run = tmp_path / "run_b"
    root = run / "checkpoints"
    engine = TorchEngine(m, cfg, torch.device("cpu"))
    client = {"step": 8, "epoch": 0, "batches_in_epoch": 8, "world_size": 1, "config": config_to_dict(cfg)}
    engine.save(root, step_tag(4), {**client, "step": 4})
    engine.save(root, step_tag(8), client)
    publish(root, step_tag(8), keep_last=2)
    save_consolidated(run / "checkpoint.pt", _trained_looking(2).state_dict(), cfg, step=1)
    out["torch-engine folder"] = root / step_tag(8)
    out["torch-engine state.pt"] = root / step_tag(8) / "state.pt"
    out["checkpoints folder"] = root
    out["run folder (checkpoints/latest)"] = run
    return out, sd


NAMES = [
    "checkpoint.pt",
    "checkpoint_best.pt",
    "exported .safetensors",
    "run folder (checkpoint.pt)",
    "run folder (checkpoints/latest)",
    "checkpoints folder",
    "torch-engine folder",
    "torch-engine state.pt",
]


@pytest.mark.parametrize("name", NAMES)
def test_each_of_our_sources_loads_the_same_state(sources, name):
    paths, sd = sources
    fresh = _model()
    report = load_weights(fresh, paths[name])
    assert report.layout == "ours"
    assert not (report.missing or report.unexpected or report.converted or report.dropped)
    _assert_same(fresh, sd)


def test_resolve_source_is_the_one_rule(sources, tmp_path):
    paths, _ = sources
    state = paths["torch-engine state.pt"]
    assert resolve_source(paths["run folder (checkpoints/latest)"]) == (state, "torch")
    assert resolve_source(paths["checkpoints folder"]) == (state, "torch")
    assert resolve_source(paths["torch-engine folder"]) == (state, "torch")
    assert resolve_source(paths["run folder (checkpoint.pt)"]) == (paths["checkpoint.pt"], "file")
    # export reads through the same rule: a checkpoints folder exports its latest.
    summary = export_weights(paths["checkpoints folder"], tmp_path / "c.safetensors")
    assert summary["source"] == str(state) and summary["step"] == "8"
    # A run folder whose latest names a checkpoint that is gone falls back to its checkpoint.pt; the
    # checkpoints folder itself is an error naming the missing tag.
    run = paths["run folder (checkpoints/latest)"]
    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    assert resolve_source(run) == (run / "checkpoint.pt", "file")
    with pytest.raises(FileNotFoundError, match="its latest names checkpoint 'step_00000099', which is not"):
        load_weights(_model(), run / "checkpoints")


def test_released_albef_file_converts(tmp_path):
    src, released = released_pretraining_model()
    path = tmp_path / "ALBEF_4M.pth"
    torch.save({"model": released, "epoch": 29}, path)
    dst = _model()
    report = load_weights(dst, path)
    assert report.layout == "albef" and report.source == str(path)
    check_released_loaded(src, dst, report)
    # Our exporter refuses it: it is no checkpoint of ours, and writing it as one would skip the conversion.
    with pytest.raises(ValueError, match="ALBEF_4M.pth is not an albef-ds checkpoint"):
        export_weights(path, tmp_path / "w.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("kind", ["deit", "auto"])
def test_deit_file_loads_into_vision_encoder(tmp_path, suffix, kind):
    _, sd = _deit_state(img=24)  # 3x3 grid; our model is 32 px -> 4x4
    path = tmp_path / f"deit{suffix}"
    if suffix == ".pth":
        torch.save({"model": sd}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    m = _model()
    img = torch.randn(2, 3, 32, 32)
    before = m.visual_encoder.forward_features(img)
    check_deit_loaded(m, sd, load_weights(m, path, kind=kind), before, img)


@pytest.mark.parametrize("kind", ["bert", "auto"])
def test_bert_folder_loads_into_text_encoder(tmp_path, kind):
    m = _model()
    hf, sd = bert_pretraining_state(m.cfg.text)
    folder = tmp_path / "bert-base-uncased"
    folder.mkdir()
    save_file(
        {k: v.clone().contiguous() for k, v in sd.items() if k != "cls.predictions.decoder.weight"},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text("{}")
    report = load_weights(m, folder, kind=kind)
    assert report.source == str(folder / "model.safetensors")
    check_bert_loaded(m, hf, sd, report)


def test_bert_old_gamma_beta_names_and_pytorch_bin(tmp_path):
    m = _model()
    sd, old = old_bert_state(m.cfg.text)
    (tmp_path / "b").mkdir()
    torch.save(old, tmp_path / "b" / "pytorch_model.bin")
    report = load_weights(m, tmp_path / "b", kind="bert")
    assert any("gamma" in c for c in report.converted)
    torch.testing.assert_close(
        m.text_encoder.bert.embeddings.LayerNorm.weight, sd["bert.embeddings.LayerNorm.weight"]
    )
    load_weights(_model(), tmp_path / "b" / "pytorch_model.bin", kind="bert")  # the file itself


def test_init_weights_deit_then_bert_then_a_whole_model_folder(tmp_path, sources):
    paths, sd = sources
    _, deit = _deit_state(img=32)
    torch.save({"model": deit}, tmp_path / "deit.pth")
    m = _model()
    _, bert = bert_pretraining_state(m.cfg.text)
    (tmp_path / "bert").mkdir()
    torch.save(bert, tmp_path / "bert" / "pytorch_model.bin")
    reports = init_weights(m, vit=str(tmp_path / "deit.pth"), bert=str(tmp_path / "bert"))
    assert [r.layout for r in reports] == ["deit", "bert"]
    # Momentum copies follow each partial load.
    assert torch.equal(m.visual_encoder_m.blocks[1].mlp.fc1.weight, deit["blocks.1.mlp.fc1.weight"])
    fc = "encoder.layer.3.output.dense.weight"
    assert torch.equal(m.text_encoder_m.bert.state_dict()[fc], bert[f"bert.{fc}"])
    # A whole-model source last (a run folder: folders are accepted for pre-training's albef_init too).
    run = paths["run folder (checkpoints/latest)"]
    reports = init_weights(m, vit=str(tmp_path / "deit.pth"), bert=str(tmp_path / "bert"), albef=str(run))
    assert [r.layout for r in reports] == ["deit", "bert", "ours"]
    _assert_same(m, sd)
    assert init_weights(m) == []


def test_missing_and_unrecognised_sources_name_the_path_and_what_was_expected(sources, tmp_path):
    paths, _ = sources
    with pytest.raises(FileNotFoundError, match=r"nope\.pth does not exist \(expected a weights file"):
        load_weights(_model(), tmp_path / "nope.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="empty: neither a checkpoint folder .* nor a bert-base"):
        load_weights(_model(), empty)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin in BERT folder"):
        load_weights(_model(), empty, kind="bert")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth is not a loadable checkpoint file"):
        load_weights(_model(), tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a readable safetensors file"):
        load_weights(_model(), tmp_path / "junk.safetensors")
    torch.save({"optimizer": torch.zeros(2), "lr": 1.0}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a layout we load"):
        load_weights(_model(), tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt holds a list, expected a dict"):
        load_weights(_model(), tmp_path / "list.pt")
    with pytest.raises(ValueError, match="unknown weights kind 'timm'"):
        load_weights(_model(), paths["checkpoint.pt"], kind="timm")
    # A shape mismatch names the key, both shapes and the file.
    other = ALBEFPretrain(tiny_model_config(embed_dim=8), special_tokens=SPECIAL)
    torch.save({"albef_ds_format": 1, "model": other.state_dict()}, tmp_path / "bad.pt")
    want = r"(?s)mismatch loading \S*bad\.pt:.*vision_proj\.weight: ours \(16, 32\), file \(8, 32\)"
    with pytest.raises(ValueError, match=want):
        load_weights(_model(), tmp_path / "bad.pt")
    # A folder posing as a DeepSpeed checkpoint whose model-state file is something else.
    ds = tmp_path / "ds"
    ds.mkdir()
    shutil.copy(paths["checkpoint.pt"], ds / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="no 'module' entry; not a DeepSpeed model-state file"):
        load_weights(_model(), ds)
