"""Typed config: YAML + overrides, strict keys and types, cross-field validation, resolved file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from albef_ds.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["debug", "pretrain_4m", "pretrain_14m"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)
    if name != "debug":  # the paper's recipe
        assert cfg.model.vision.image_size == 256 and cfg.model.queue_size == 65536
        assert cfg.train.batch_size == 64 and cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.02
        assert cfg.model.momentum == 0.995 and cfg.loss.alpha == 0.4 and cfg.train.epochs == 30
        assert cfg.model.text.fusion_layer == 6 and cfg.model.embed_dim == 256
    assert len(load_config(ROOT / "configs/pretrain_14m.yaml").data.train_file) == 6


def test_overrides_apply_with_types():
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [
            "optim.lr=2e-4",
            "train.max_steps=7",
            "data.hflip=false",
            "data.crop_scale=[0.3, 0.9]",
            "model.vision.depth=1",
        ],
    )
    assert cfg.optim.lr == 2e-4 and cfg.train.max_steps == 7 and cfg.data.hflip is False
    assert cfg.data.crop_scale == [0.3, 0.9] and cfg.model.vision.depth == 1
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # int widens to float


def test_a_section_given_in_part_keeps_its_field_defaults(tmp_path):
    """A nested section whose field has its own default (nlvr.synth: out_dir data/synth_nlvr2; nlvr.ta_synth:
    4000 scenes, no val/test) keeps that default for every key an override or a YAML file leaves out."""
    cfg = load_config(None, ["nlvr.synth.seed=3", "nlvr.ta_synth.out_dir=elsewhere"])
    assert (cfg.nlvr.synth.seed, cfg.nlvr.synth.out_dir) == (3, "data/synth_nlvr2")
    ta = cfg.nlvr.ta_synth
    assert (ta.out_dir, ta.num_train, ta.num_val, ta.num_test) == ("elsewhere", 4000, 0, 0)
    (tmp_path / "c.yaml").write_text("ve:\n  synth: {num_train: 9}\n")
    ve = load_config(tmp_path / "c.yaml").ve.synth
    assert (ve.num_train, ve.out_dir) == (9, Config().ve.synth.out_dir) and ve.out_dir


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lrr=1e-4", r"unknown config key 'optim\.lrr'"),
        ("model.vision.dept=3", r"unknown config key 'model\.vision\.dept'"),
        ("trian.seed=1", r"unknown config key 'trian'"),
        ("optim.lr=fast", r"'optim\.lr'.*expected float"),
        ("train.max_steps=1.5", r"'train\.max_steps'.*expected int"),
        ("data.hflip=1", r"'data\.hflip'.*expected bool"),
        ("data.train_file=a.json", r"'data\.train_file'.*expected a list"),
        ("model.vision=3", r"'model\.vision'.*expected a mapping"),
        ("lr", r"section\.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_file_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-4\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.warmup' in .*c\.yaml"):
        load_config(p)
    p.write_text("train:\n  batch_size: big\n")
    with pytest.raises(ConfigError, match=r"'train\.batch_size' \(in .*c\.yaml\): expected int"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p.write_bytes(b"train:\n  output_dir: runs/\xff\xfe\n")  # not UTF-8: named, not a UnicodeDecodeError
    with pytest.raises(ConfigError, match=r"config file .*c\.yaml is not UTF-8 text \(byte 26"):
        load_config(p)


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.vision.image_size=100", r"model\.vision\.image_size \(100\).*model\.vision\.patch_size"),
        ("model.text.fusion_layer=12", r"model\.text\.fusion_layer"),
        ("train.batch_size=1", r"train\.batch_size"),
        ("data.tokenizer_mode=bert", r"data\.tokenizer_mode"),
        ("model.queue_size=-1", r"model\.queue_size"),
    ],
)
def test_cross_field_validation(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,match",
    [
        # zero divisors and counts: refused before the cross-field checks would divide by them
        ("model.vision.patch_size=0", r"model\.vision\.patch_size must be >= 1, got 0"),
        ("model.vision.heads=0", r"model\.vision\.heads must be >= 1, got 0"),
        ("model.text.heads=0", r"model\.text\.heads must be >= 1, got 0"),
        ("train.log_every=0", r"train\.log_every must be >= 1, got 0"),
        ("train.max_steps=0", r"train\.max_steps must be -1 \(the epochs decide\) or >= 1, got 0"),
        ("train.epochs=0", r"train\.epochs must be >= 1"),
        ("optim.lr=-1e-4", r"optim\.lr must be > 0, got -0\.0001"),
        ("optim.lr=.nan", r"optim\.lr must be > 0, got nan"),
        ("data.num_workers=-1", r"data\.num_workers must be >= 0, got -1"),
        ("model.text.dropout=1.0", r"model\.text\.dropout must be in \[0, 1\)"),
        ("data.randaug_m=11", r"data\.randaug_m must be in 0\.\.10"),
        ("loss.alpha_ramp_steps=-2", r"loss\.alpha_ramp_steps must be >= -1"),
        ("train.keep_last=0", r"train\.keep_last must be >= 1"),
    ],
)
def test_numeric_ranges_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_every_range_names_a_real_numeric_field():
    from albef_ds.config import NUMERIC_RANGES, Config

    cfg = Config()
    for key, *_ in NUMERIC_RANGES:
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)  # AttributeError on a misspelt key
        assert isinstance(obj, (int, float)) and not isinstance(obj, bool), key
    assert load_config(None).train.max_steps == -1  # the defaults pass


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/debug.yaml", ["optim.lr=3e-4"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    raw = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert raw["optim"]["lr"] == 3e-4 and "warmup_steps" in raw["optim"]  # defaults are written too
