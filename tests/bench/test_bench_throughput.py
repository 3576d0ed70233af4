"""`albef-ds bench throughput` end to end on CPU: the debug config under DeepSpeed (one rank) and a
mid-size config, both recipes in one run; the JSON holds every field and the numbers hang together."""

from __future__ import annotations

import json

import pytest

from albef_ds.bench.throughput import SECTIONS
from albef_ds.cli import main
from tests.helpers import ROOT

RECIPE_FIELDS = {
    "recipe",
    "params_trainable",
    "precision",
    "batch_per_device",
    "steps",
    "warmup",
    "elapsed_s",
    "step_time_s",
    "samples_per_s",
    "samples_per_s_per_device",
    "breakdown_s",
    "peak_mem_gb",
    "model_flops_per_step",
    "executed_flops_per_step",
    "executed_flops_by_component",
    "achieved_tflops_per_device",
    "mean_loss",
    "mfu",
}


@pytest.mark.parametrize(
    "config,overrides,engine",
    [
        ("debug", ["train.batch_size=8"], "deepspeed"),
        ("bench_mid", ["train.batch_size=4", "model.queue_size=256"], "torch"),
    ],
)
def test_bench_throughput_both_recipes(tmp_path, capsys, config, overrides, engine):
    out = tmp_path / f"{config}.json"
    argv = ["bench", "throughput", "--config", str(ROOT / f"configs/{config}.yaml"), *overrides]
    argv += ["--engine", engine, "--warmup", "1", "--steps", "2", "--out", str(out), "--peak-tflops", "1"]
    try:
        assert main(argv) == 0
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # the deepspeed case formed a 1-rank group in this process
            dist.destroy_process_group()
    printed = capsys.readouterr().out
    assert "ours / reference:" in printed
    res = json.loads(out.read_text())
    assert (tmp_path / f"{config}.png").stat().st_size > 0
    assert res["engine"] == engine and res["world_size"] == 1 and res["params_trainable"] > 0
    ours, ref = res["recipes"]
    assert (ours["recipe"], ref["recipe"]) == ("ours", "reference") and ref["precision"] == "fp32"
    for r in (ours, ref):
        assert RECIPE_FIELDS <= r.keys(), RECIPE_FIELDS - r.keys()
        assert set(r["breakdown_s"]) == {*SECTIONS, "other"}
        assert sum(r["breakdown_s"].values()) == pytest.approx(r["step_time_s"], rel=0.02)
        for k in ("online_forward", "momentum_forward", "itm", "mlm", "backward", "optimizer"):
            assert r["breakdown_s"][k] > 0, k
        assert r["samples_per_s"] == pytest.approx(r["batch_per_device"] / r["step_time_s"])
        assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / r["step_time_s"] / 1e12)
    # Same model FLOPs for both; the reference executes more (its MLM head covers every position).
    assert ours["model_flops_per_step"] == ref["model_flops_per_step"]
    assert ref["executed_flops_per_step"] > ours["executed_flops_per_step"]
    assert res["speedup_vs_reference"] == pytest.approx(ours["samples_per_s"] / ref["samples_per_s"])


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    base = ["bench", "throughput", "--config", str(ROOT / "configs/debug.yaml")]
    assert main([*base, "--steps", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--steps >= 1" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x.txt")]) == 2
    assert "must end in .json" in capsys.readouterr().err


@pytest.mark.slow
def test_every_lever_side_by_side_with_repeats(tmp_path, capsys):
    """`--recipe all --repeats 2`: ours, ours+compile, ours+patch_dropout and the reference, interleaved; each
    reports its median repeat and the spread, the ratios are per round, compile shows no graph break, and
    patch dropout's model FLOPs (hence its MFU) count only the patches it keeps."""
    out = tmp_path / "levers.json"
    argv = ["bench", "throughput", "--config", str(ROOT / "configs/debug.yaml"), "train.batch_size=8"]
    argv += ["--engine", "torch", "--recipe", "all", "--repeats", "2", "--warmup", "1", "--steps", "1"]
    argv += ["--out", str(out), "--peak-tflops", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ours+compile / ours:" in printed and "ours / reference:" in printed and "over 2" in printed
    res = json.loads(out.read_text())
    assert res["repeats"] == 2
    by = {r["recipe"]: r for r in res["recipes"]}
    assert list(by) == ["ours", "ours+compile", "ours+patch_dropout", "reference"]
    for r in by.values():
        assert RECIPE_FIELDS <= r.keys()
        sp = r["repeats_summary"]["samples_per_s"]
        assert len(sp["runs"]) == 2 and sp["min"] <= sp["median"] <= sp["max"]
        assert r["samples_per_s"] in sp["runs"]  # the entry is one of the measured repeats
    assert by["ours+compile"]["compile"]["graphs"] > 0 and by["ours+compile"]["compile"]["graph_breaks"] == 0
    assert "compile" not in by["ours"]
    pd = by["ours+patch_dropout"]
    assert pd["patch_dropout"] == 0.5 and by["ours"]["patch_dropout"] == by["reference"]["patch_dropout"] == 0
    assert pd["model_flops_per_step"] < by["ours"]["model_flops_per_step"]
    assert pd["mfu"] == pytest.approx(pd["model_flops_per_step"] / pd["step_time_s"] / 1e12)
    ratio = res["ratios"]["ours / reference"]
    assert ratio["runs"] == pytest.approx([a / b for a, b in zip(_runs(by["ours"]), _runs(by["reference"]))])
    assert res["speedup_vs_reference"] == ratio["median"]
    assert set(res["ratios"]) >= {"ours+compile / ours", "ours+patch_dropout / ours", "reference / ours"}


def _runs(recipe: dict) -> list[float]:
    return recipe["repeats_summary"]["samples_per_s"]["runs"]


def test_unknown_or_bad_lever_arguments_are_clear_errors(tmp_path, capsys):
    base = ["bench", "throughput", "--config", str(ROOT / "configs/debug.yaml"), "--engine", "torch"]
    assert main([*base, "--repeats", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    argv = [
        *base,
        "--recipe",
        "ours+patch_dropout",
        "--patch-dropout",
        "1.5",
        "--out",
        str(tmp_path / "y.json"),
    ]
    assert main(argv) == 2
    assert "--patch-dropout must lie in (0, 1)" in capsys.readouterr().err
