"""benchmarks/debug_probe.py: the counterfactual captions, and the attribute probe of the demo's model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from albef_ds.config import load_config
from albef_ds.data.synth import contrasting_backgrounds

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("debug_probe", ROOT / "benchmarks/debug_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

ATTRS = {"shape": "circle", "colour": "red", "size": "small", "position": "top", "texture": "plain"}


def test_a_counterfactual_changes_exactly_one_attribute_to_a_value_the_generator_draws():
    gen = torch.Generator().manual_seed(0)
    a = {**ATTRS, "background": "grey"}
    for key in probe.VALUES:
        seen = set()
        for _ in range(50):
            b = probe.counterfactual(a, key, gen)
            assert b is not None and b[key] != a[key]
            assert {k for k in a if a[k] != b[k]} == {key}
            seen.add(b[key])
        pool = contrasting_backgrounds(["red"]) if key == "background" else probe.VALUES[key]
        assert seen == set(pool) - {a[key]}, key  # every other drawable value, nothing else
    # black objects contrast with only some backgrounds: a counterfactual never names another one
    dark = {**ATTRS, "colour": "black", "background": contrasting_backgrounds(["black"])[0]}
    for _ in range(20):
        b = probe.counterfactual(dark, "background", gen)
        assert b is None or b["background"] in contrasting_backgrounds(["black"])


def test_the_probe_caption_names_every_attribute_once():
    cap = probe.probe_caption({**ATTRS, "background": "teal"})
    assert cap == "a small red circle at the top on a teal background"


@pytest.mark.slow
def test_the_demo_model_knows_colour_and_the_control_knows_nothing(demo_pretrained, tmp_path):
    """On the demo's pre-trained model (the shared session run): ITC tells the true colour from another
    nearly always; MLM fills in the colour from the image and is at chance with an unrelated image."""
    s = demo_pretrained.synth
    cfg = load_config(
        str(ROOT / "configs/debug.yaml"),
        [f"data.tokenizer={s / 'vocab.txt'}", f"data.eval_file={s / 'eval.json'}"],
    )
    res = probe.attribute_probe(cfg, str(demo_pretrained.run))
    n = len(json.loads((s / "eval.json").read_text()))
    assert res["colour"]["pairs"] == n and res["shape"]["pairs"] == n
    assert res["colour"]["itc"] >= 90.0, res["colour"]
    assert res["colour"]["mlm"] >= 60.0, res["colour"]
    assert res["colour"]["mlm_other_image"] <= 30.0, res["colour"]  # chance 12.5
    for k, r in res.items():
        assert all(0.0 <= r[m] <= 100.0 for m in ("itc", "itm", "mlm", "mlm_other_image")), k
