"""The DeepSpeed JSON filled from the experiment config; contradictions fail before anything is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from albef_ds.cli import main
from albef_ds.config import ConfigError, load_config
from albef_ds.train.ds_config import build_ds_config, global_batch, scaled_lr

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*ov):
    return load_config(ROOT / "configs/pretrain_4m.yaml", ["model.vit_init=", "model.bert_init=", *ov])


@pytest.mark.parametrize(
    "name,precision",
    [
        ("zero2_bf16.json", "bf16"),
        ("zero2_fp16.json", "fp16"),
        ("zero2_cpu.json", "fp32"),
        ("zero2_fp32.json", "fp32"),
    ],
)
def test_shipped_ds_configs_fill_from_the_experiment_config(name, precision):
    cfg = _cfg("train.grad_accum=2", "optim.grad_clip=0.0")
    ds = build_ds_config(cfg, world_size=8, path=ROOT / "ds_configs" / name)
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 64 * 2 * 8
    assert ds["gradient_clipping"] == 0.0  # set explicitly: DeepSpeed would default to 1.0
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    assert ds["zero_optimization"]["stage"] == 2
    assert "auto" not in json.dumps(ds)


def test_batch_layout_contradiction_names_the_fields():
    cfg = _cfg("train.global_batch_size=512", "train.grad_accum=2")
    assert global_batch(_cfg("train.global_batch_size=512"), 8) == 512
    with pytest.raises(
        ConfigError,
        match=r"train\.global_batch_size \(512\) != train\.batch_size \(64\) x "
        r"train\.grad_accum \(2\) x world size \(8\) = 1024",
    ):
        build_ds_config(cfg, world_size=8)


def test_explicit_json_values_must_agree(tmp_path):
    src = json.loads((ROOT / "ds_configs/zero2_bf16.json").read_text())
    src["train_micro_batch_size_per_gpu"] = 32
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(src))
    with pytest.raises(
        ConfigError,
        match=r"ds\.json: train_micro_batch_size_per_gpu = 32 contradicts "
        r"train\.batch_size = 64",
    ):
        build_ds_config(_cfg(), world_size=8, path=p)
    src["train_micro_batch_size_per_gpu"] = 64
    src["gradient_clipping"] = 1.0
    p.write_text(json.dumps(src))
    with pytest.raises(ConfigError, match=r"gradient_clipping = 1\.0 contradicts optim\.grad_clip = 0\.0"):
        build_ds_config(_cfg(), world_size=8, path=p)
    assert build_ds_config(_cfg("optim.grad_clip=1.0"), world_size=8, path=p)["gradient_clipping"] == 1.0


def test_precision_must_agree_with_the_json(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.precision = 'fp16' contradicts .*zero2_bf16\.json"):
        build_ds_config(_cfg("train.precision=fp16"), world_size=1)
    src = json.loads((ROOT / "ds_configs/zero2_bf16.json").read_text())
    src["bf16"]["enabled"] = "auto"
    src["fp16"] = {"enabled": "auto"}
    p = tmp_path / "auto.json"
    p.write_text(json.dumps(src))
    ds = build_ds_config(_cfg("train.precision=fp16"), world_size=1, path=p)
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False


def test_bad_json_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_ds_config(_cfg(), world_size=1, path=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        build_ds_config(_cfg(), world_size=1, path=tmp_path / "bad.json")
    src = json.loads((ROOT / "ds_configs/zero2_cpu.json").read_text())
    src["zero_optimization"]["stage"] = 3
    (tmp_path / "z3.json").write_text(json.dumps(src))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage must be 2"):
        build_ds_config(_cfg(), world_size=1, path=tmp_path / "z3.json")
    src["zero_optimization"]["stage"] = 2
    src["optimizer"] = {"type": "Adam"}
    (tmp_path / "opt.json").write_text(json.dumps(src))
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        build_ds_config(_cfg(), world_size=1, path=tmp_path / "opt.json")


def test_linear_lr_scaling_rule():
    assert scaled_lr(_cfg(), 8) == pytest.approx(1e-4)  # the paper: 1e-4 at 8 x 64 = 512
    assert scaled_lr(_cfg(), 16) == pytest.approx(2e-4)  # the maintainer's advice at 16 GPUs
    assert scaled_lr(_cfg("optim.lr_ref_batch=0"), 16) == pytest.approx(1e-4)


def test_pretrain_fails_on_a_contradiction_before_building_anything(tmp_path, capsys):
    rc = main(
        [
            "pretrain",
            "--config",
            str(ROOT / "configs/debug.yaml"),
            "train.global_batch_size=100",
            f"train.output_dir={tmp_path / 'run'}",
        ]
    )
    assert rc == 2
    assert "train.global_batch_size (100) != train.batch_size (32)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # failed before the run folder, tokenizer or model


@pytest.mark.parametrize("amp", [{"enabled": True, "opt_level": "O1"}, {"enabled": False}])
def test_removed_apex_amp_section_is_refused_with_the_file_and_the_replacement(tmp_path, capsys, amp):
    """DeepSpeed 0.19 removed its NVIDIA-apex `amp` section (apex itself dropped apex.amp): a leftover one is
    refused before anything is built, naming the file and the key and pointing at bf16 / fp16."""
    src = json.loads((ROOT / "ds_configs/zero2_cpu.json").read_text())
    src["amp"] = amp
    p = tmp_path / "old_amp.json"
    p.write_text(json.dumps(src))
    want = r"old_amp\.json: 'amp' .*removed.*'bf16'.*'fp16'.*train\.precision"
    with pytest.raises(ConfigError, match=want):
        build_ds_config(_cfg(), world_size=1, path=p)
    rc = main(
        [
            "pretrain",
            "--config",
            str(ROOT / "configs/debug.yaml"),
            "train.engine=deepspeed",
            f"train.ds_config={p}",
            f"train.output_dir={tmp_path / 'run'}",
        ]
    )
    assert rc == 2
    assert f"{p}: 'amp'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_throughput_timer_off_unless_the_json_asks(tmp_path):
    """DeepSpeed's throughput timer synchronizes the device at every forward and step: off by default."""
    cfg = _cfg()
    ds = build_ds_config(cfg, world_size=1, path=ROOT / "ds_configs/zero2_bf16.json")
    assert ds["timers"] == {"throughput": {"enabled": False}}
    src = json.loads((ROOT / "ds_configs/zero2_bf16.json").read_text())
    p = tmp_path / "timed.json"
    p.write_text(json.dumps({**src, "timers": {"throughput": {"enabled": True, "synchronized": False}}}))
    assert build_ds_config(cfg, world_size=1, path=p)["timers"]["throughput"] == {
        "enabled": True,
        "synchronized": False,
    }
    p.write_text(json.dumps({**src, "timers": {"throughput": True}}))
    with pytest.raises(ConfigError, match=r"timed\.json: 'timers' and 'timers\.throughput' must be objects"):
        build_ds_config(cfg, world_size=1, path=p)
