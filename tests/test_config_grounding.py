"""The grounding config section: fields, the optional (null) Grad-CAM layer, its validation and default."""

from __future__ import annotations

import pytest

from albef_ds.config import ConfigError, GroundingSynthConfig, load_config, save_config


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config(None)
    g = cfg.grounding
    assert g.gradcam_kind == "itm" and g.gradcam_layer is None and g.iou_threshold == 0.5
    assert g.resolved_gradcam_layer(cfg.model) == 8  # the reference's: the 3rd fusion layer of ALBEF-base
    assert isinstance(g.synth, GroundingSynthConfig) and g.synth.out_dir == "data/synth_grounding"
    cfg = load_config(
        None,
        [
            "grounding.gradcam_layer=7",
            "grounding.train_file=[a.json]",
            "grounding.refs_file=refs.json",
            "grounding.synth.num_proposals=5",
            "grounding.synth.position_words=false",
            "grounding.synth.shape_words=false",
        ],
    )
    assert cfg.grounding.gradcam_layer == 7 and cfg.grounding.resolved_gradcam_layer(cfg.model) == 7
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    nulled = load_config(tmp_path / "c.yaml", ["grounding.gradcam_layer=null"])
    assert nulled.grounding.gradcam_layer is None
    save_config(nulled, tmp_path / "n.yaml")
    assert "gradcam_layer: null" in (tmp_path / "n.yaml").read_text()
    assert load_config(tmp_path / "n.yaml") == nulled


def test_default_layer_fits_small_models():
    itm = load_config(None, ["model.text.layers=4", "model.text.fusion_layer=2", "model.vision.depth=3"])
    assert itm.grounding.resolved_gradcam_layer(itm.model) == 2  # the first of two fusion layers
    itc = load_config(None, ["model.vision.depth=3", "grounding.gradcam_kind=itc"])
    assert itc.grounding.resolved_gradcam_layer(itc.model) == 2  # the last ViT block
    base = load_config(None, ["grounding.gradcam_kind=itc"])
    assert base.grounding.resolved_gradcam_layer(base.model) == 8  # the reference's --block_num default


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["grounding.gradcam_kind=cam"], r"grounding\.gradcam_kind must be 'itm' or 'itc'"),
        (
            ["grounding.gradcam_layer=5"],
            r"grounding\.gradcam_layer \(5\) must be a fusion layer .*fusion_layer \(6\)",
        ),
        (["grounding.gradcam_layer=12"], r"grounding\.gradcam_layer \(12\) must be a fusion layer"),
        (
            ["grounding.gradcam_kind=itc", "grounding.gradcam_layer=12"],
            r"must be a ViT block .*depth - 1 \(11\)",
        ),
        (["grounding.gradcam_layer=high"], r"'grounding\.gradcam_layer'.*expected int \| None"),
        (["grounding.gradcam_layer=1.5"], r"'grounding\.gradcam_layer'.*expected int \| None"),
        (["grounding.iou_threshold=0"], r"grounding\.iou_threshold must lie in \(0, 1\]"),
        (["grounding.eval_every=0"], r"grounding\.eval_every must be >= 1"),
        (["grounding.synth.num_proposal=3"], r"unknown config key 'grounding\.synth\.num_proposal'"),
    ],
)
def test_validation_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
