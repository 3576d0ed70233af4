"""`albef-ds evaluate --checkpoint` and `albef-ds export` on a real 3-step run (seconds): a run folder and its
checkpoints folder evaluate to the run's own numbers; weights that do not fit the model are refused with the
parts they leave missing, unless a partial load is asked for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from albef_ds.cli import main
from albef_ds.train.checkpoint.manager import save_consolidated

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs/debug.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 3-step debug pre-training with a resumable checkpoint at its last step (checkpoints/latest) and its
    checkpoint.pt; (run folder, the overrides it ran with)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    synth = tmp / "synth"
    ov = [
        f"data.synth.out_dir={synth}",
        "data.synth.num_train=48",
        "data.synth.num_eval=16",
        f"data.train_file=[{synth / 'train.json'}]",
        f"data.eval_file={synth / 'eval.json'}",
        f"data.tokenizer={synth / 'vocab.txt'}",
        "data.num_workers=0",
        "train.tensorboard=false",
        f"train.output_dir={tmp / 'run'}",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.save_every=3",
        "train.eval_at_start=false",
    ]
    assert main(["data", "synth", "--config", CFG, *ov]) == 0
    assert main(["pretrain", "--config", CFG, *ov]) == 0
    return tmp / "run", ov


def _run_eval(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in reversed(records) if r["event"] == "eval_val")


@pytest.mark.parametrize("where", ["run folder", "checkpoints folder"])
def test_evaluate_a_run_or_checkpoints_folder(tiny_run, tmp_path, where, caplog):
    run, ov = tiny_run
    source = run if where == "run folder" else run / "checkpoints"
    out = tmp_path / "m.json"
    with caplog.at_level(logging.INFO, logger="albef_ds.model.weights"):
        rc = main(
            ["evaluate", "pretrain", "--config", CFG, *ov, "--checkpoint", str(source), "--output", str(out)]
        )
    assert rc == 0
    # Both resolve to the newest complete checkpoint (checkpoints/latest), loaded whole.
    state = run / "checkpoints" / "step_00000003" / "state.pt"
    assert any(f"from {state}" in r.getMessage() and "missing" not in r.getMessage() for r in caplog.records)
    got, want = json.loads(out.read_text()), _run_eval(run)
    for k in ("txt_r1", "txt_r5", "img_r1", "img_r10", "r_mean"):
        assert got[k] == pytest.approx(want[k]), k


def test_weights_that_fit_nothing_are_refused_unless_partial(tiny_run, tmp_path, capsys):
    run, ov = tiny_run
    bad = save_consolidated(tmp_path / "other.pt", {"other_net.weight": torch.zeros(3, 3)}, {})
    args = ["evaluate", "pretrain", "--config", CFG, *ov, "--checkpoint", str(bad)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "vision encoder" in err and "fusion encoder" in err and "ITM head" in err
    assert "visual_encoder.cls_token" in err and "other_net.weight" in err and "--allow-partial" in err
    assert main([*args, "--allow-partial"]) == 0

    # A checkpoint of the run without its fusion layers: the fusion encoder is named, with example keys.
    sd = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    cut = {k: v for k, v in sd.items() if not k.startswith("text_encoder.bert.encoder.layer.3.")}
    cut_path = save_consolidated(tmp_path / "cut.pt", cut, {})
    assert main(["evaluate", "pretrain", "--config", CFG, *ov, "--checkpoint", str(cut_path)]) == 2
    err = capsys.readouterr().err
    assert "fusion encoder: 26 of 52 tensors missing" in err and "text_encoder.bert.encoder.layer.3." in err
    assert "vision encoder" not in err


def test_export_refuses_tensors_that_do_not_fit_the_run_config(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    sd = dict(ckpt["model"])
    sd["vision_proj.weight"] = torch.zeros(8, sd["vision_proj.weight"].shape[1])
    bad = save_consolidated(tmp_path / "bad.pt", sd, ckpt["config"], step=3)
    out = tmp_path / "w.safetensors"
    capsys.readouterr()
    assert main(["export", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vision_proj.weight: config (64, 96), file (8, 96)" in err and str(bad) in err
    assert not out.exists()
    # Missing parts are refused too, unless a partial export is asked for; shapes never are.
    sd = {k: v for k, v in ckpt["model"].items() if not k.startswith("itm_head.")}
    part = save_consolidated(tmp_path / "part.pt", sd, ckpt["config"], step=3)
    assert main(["export", str(part), "-o", str(out)]) == 2
    assert "ITM head: 2 of 2 tensors missing" in capsys.readouterr().err
    assert main(["export", str(part), "-o", str(out), "--allow-partial"]) == 0
    assert out.is_file()
    assert main(["export", str(bad), "-o", str(tmp_path / "b.safetensors"), "--allow-partial"]) == 2
    # The run itself exports (a run folder: its checkpoints/latest).
    assert main(["export", str(run), "-o", str(tmp_path / "run.safetensors")]) == 0
