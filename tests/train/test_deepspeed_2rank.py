"""A real 2-rank DeepSpeed ZeRO-2 pre-training run (`deepspeed --num_gpus 2` on the CPU accelerator, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from albef_ds.cli import main
from tests.helpers import launch_deepspeed

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16  # two epochs of 8 steps per rank: 256 pairs / (16 per rank x 2 ranks)


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds2")
    synth = tmp / "synth"
    data_ov = [
        f"data.synth.out_dir={synth}",
        "data.synth.num_train=256",
        "data.synth.num_eval=20",
        f"data.train_file=[{synth / 'train.json'}]",
        f"data.eval_file={synth / 'eval.json'}",
        f"data.tokenizer={synth / 'vocab.txt'}",
    ]
    assert main(["data", "synth", "--config", str(ROOT / "configs/debug.yaml"), *data_ov]) == 0
    run = tmp / "run"
    out = launch_deepspeed(
        2,
        [
            "pretrain",
            "--config",
            str(ROOT / "configs/debug.yaml"),
            *data_ov,
            "train.engine=deepspeed",
            f"train.output_dir={run}",
            f"train.max_steps={STEPS}",
            "train.batch_size=16",
            "train.log_every=4",
            "train.record_samples=true",
            "train.eval_at_start=false",
            "data.num_workers=1",
            "model.queue_size=50",  # not a multiple of the global batch (32): the ring wraps
            "train.save_every=8",  # the last step (16) leaves a DeepSpeed checkpoint to export
        ],
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    reports = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    return run, reports, out.stdout + out.stderr


def test_two_ranks_train_and_losses_fall(ds_run):
    run, reports, log = ds_run
    assert "DeepSpeed ZeRO-2 on 2 ranks" in log
    assert [r["world_size"] for r in reports] == [2, 2] and [r["steps"] for r in reports] == [STEPS] * 2
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["event"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12, 16]
    for r in train:
        assert all(r[k] == r[k] and abs(r[k]) < 1e6 for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"))
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["loss_mlm"] < train[0]["loss_mlm"]


def test_each_rank_holds_half_of_the_optimizer_state(ds_run):
    _, reports, _ = ds_run
    n = reports[0]["trainable_params"]
    held = [r["optimizer_state_numel"] for r in reports]
    # AdamW keeps exp_avg and exp_avg_sq: 2n elements in all, split across the ranks by ZeRO-2
    # (a partition may be padded by a few elements for alignment).
    assert sum(held) == pytest.approx(2 * n, rel=1e-3)
    for h in held:
        assert h == pytest.approx(n, rel=0.01)


def test_momentum_weights_and_queues_identical_across_ranks(ds_run):
    _, (r0, r1), _ = ds_run
    assert r0["momentum_sha256"] == r1["momentum_sha256"]
    assert r0["queue_sha256"] == r1["queue_sha256"]
    assert r0["queue_ptr"] == r1["queue_ptr"] == (STEPS * 32) % 50


def test_ranks_see_disjoint_data_covering_each_epoch(ds_run):
    _, (r0, r1), _ = ds_run
    for epoch in (0, 1):
        a = [i for e, i in r0["samples"] if e == epoch]
        b = [i for e, i in r1["samples"] if e == epoch]
        assert len(a) == len(b) == 8 * 16
        assert not set(a) & set(b)
        assert set(a) | set(b) == set(range(256))  # 256 pairs = 8 steps x 16 x 2 ranks: the whole epoch
    e0 = [i for e, i in r0["samples"] if e == 0]
    e1 = [i for e, i in r0["samples"] if e == 1]
    assert e0 != e1  # reshuffled per epoch


def test_tensorboard_events_hold_every_tag(ds_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = ds_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {
        "loss/total",
        "loss/itc",
        "loss/itm",
        "loss/mlm",
        "train/lr",
        "train/alpha",
        "train/temp",
        "perf/samples_per_s",
        "perf/step_time_s",
        "perf/peak_mem_gb",
        "data/skipped_images",
        "eval/txt_r1",
        "eval/img_r1",
        "eval/r_mean",
    }
    assert want <= tags, want - tags
    assert [e.step for e in acc.Scalars("loss/total")] == [4, 8, 12, 16]
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["event"] == "train"]
    for e, r in zip(acc.Scalars("loss/itc"), train):
        assert e.value == pytest.approx(r["loss_itc"], rel=1e-6)  # the same numbers as metrics.jsonl
    assert all(e.value > 0 for e in acc.Scalars("perf/peak_mem_gb"))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only


def test_export_matches_zero_to_fp32_and_reproduces_the_eval(ds_run, tmp_path, capsys):
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    run, _, _ = ds_run
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000016"
    out = tmp_path / "albef.safetensors"
    assert main(["export", str(run), "-o", str(out)]) == 0
    ours = load_file(str(out))
    # DeepSpeed's own consolidation script, shipped inside the checkpoint folder, on the same checkpoint.
    z = subprocess.run(
        [sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "z2f")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert z.returncode == 0, z.stdout[-2000:] + z.stderr[-2000:]
    theirs = torch.load(tmp_path / "z2f" / "pytorch_model.bin", weights_only=True)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k].to(ours[k].dtype)), k
    # The final consolidated checkpoint.pt (fp32 masters gathered live) holds the same weights.
    final = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    for k in final:
        assert torch.equal(final[k], ours[k]), k
    # load_weights straight from the DeepSpeed folder (ZeRO partitions) = from the exported file.
    from albef_ds.config import load_config
    from albef_ds.model import ALBEFPretrain
    from albef_ds.train.checkpoint import load_weights
    from tests.helpers import SPECIAL

    model_cfg = load_config(run / "config.yaml", []).model
    from_folder, from_file = (ALBEFPretrain(model_cfg, special_tokens=SPECIAL) for _ in range(2))
    rep = load_weights(from_folder, ckpts / "step_00000016")
    assert rep.layout == "ours" and not (rep.missing or rep.unexpected or rep.converted)
    load_weights(from_file, out)
    a, b = from_folder.state_dict(), from_file.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Evaluated from the exported file, a fresh model gives the live run's end-of-training numbers.
    live = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    live = next(r for r in live if r["event"] == "eval_val")
    capsys.readouterr()
    assert main(["evaluate", "pretrain", "--config", str(run / "config.yaml"), "--checkpoint", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    for k in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert got[k] == pytest.approx(live[k], abs=1e-9), k
