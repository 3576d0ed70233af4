"""train.compile: the ViT blocks and BERT layers compiled (CPU inductor, fp32) train the debug model like
eager ones, step by step; checkpoints and state dicts pass between compiled and eager runs both ways; the
compile summary is logged once with no graph break; evaluation and keep_attention run eagerly on compiled
blocks.

One module fixture holds every run: an eager and a compiled 10-step run of the tiny debug model (torch
engine, a checkpoint at step 5), and the two cross resumes from step 5. Compilation is paid once per process
(dynamo caches graphs per code object; later runs of the same shapes reuse them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from albef_ds.cli import main
from albef_ds.model import ALBEFPretrain
from albef_ds.model.attention import keep_attention
from albef_ds.model.compile import CompileCounters, compile_blocks, eager
from tests.helpers import SPECIAL, assert_same_state, launch_deepspeed, tiny_model_config

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs/debug.yaml")
STEPS = 10
LOSSES = ("loss", "loss_itc", "loss_itm", "loss_mlm")
# The debug model at the test sizes (tests/helpers.tiny_model_config), on the synthetic set's vocabulary.
TINY = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.width=32",
    "model.vision.depth=2",
    "model.vision.heads=2",
    "model.text.hidden=32",
    "model.text.layers=4",
    "model.text.fusion_layer=2",
    "model.text.heads=2",
    "model.text.intermediate=64",
    "model.embed_dim=16",
    "model.queue_size=20",  # 8 per step: the ring wraps
]


def _records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _records(run, "train")}


def _resume_from(src: Path, run: Path, tag: str) -> None:
    """A fresh run folder holding only `src`'s checkpoint `tag` (as `latest`)."""
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag, run / "checkpoints" / tag)
    (run / "checkpoints" / "latest").write_text(tag + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    d = tmp / "synth"
    data = [f"data.train_file=[{d / 'train.json'}]", f"data.eval_file={d / 'eval.json'}"]
    data += [f"data.tokenizer={d / 'vocab.txt'}"]
    synth = [f"data.synth.out_dir={d}", "data.synth.num_train=64", "data.synth.num_eval=8"]
    assert main(["data", "synth", "--config", CFG, *synth]) == 0
    # data.max_tokens 8: every batch has 8 tokens (the shortest captions have 7), so the graphs stay static
    common = [*data, *TINY, "data.max_tokens=8", "train.batch_size=8", f"train.max_steps={STEPS}"]
    common += ["train.log_every=1"]
    common += ["train.eval_at_start=false", "train.save_every=5", "data.num_workers=1"]
    common += ["train.tensorboard=false"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a deterministic reduction order, so 1e-5 measures the compile
    try:
        out = {"args": common}

        def pretrain(name: str, *extra: str) -> Path:
            run = tmp / name
            assert main(["pretrain", "--config", CFG, *common, f"train.output_dir={run}", *extra]) == 0
            out[name] = run
            return run

        pretrain("eager")
        pretrain("compiled", "train.compile=true")
        # Cross resumes from step 5: the compiled run's checkpoint in an eager run and the other way round.
        _resume_from(out["compiled"], tmp / "compiled_to_eager", "step_00000005")
        pretrain("compiled_to_eager", "train.resume=auto")
        _resume_from(out["eager"], tmp / "eager_to_compiled", "step_00000005")
        pretrain("eager_to_compiled", "train.resume=auto", "train.compile=true")
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.slow  # the module fixture: about 85 s (CPU inductor compile) on 2 cores
def test_compiled_losses_match_eager_step_by_step(runs):
    eager_l, comp_l = _losses(runs["eager"]), _losses(runs["compiled"])
    assert sorted(comp_l) == list(range(1, STEPS + 1))
    worst = max(abs(comp_l[s][k] - eager_l[s][k]) for s in comp_l for k in LOSSES)
    assert worst <= 1e-5, worst
    assert eager_l[1]["loss"] != eager_l[STEPS]["loss"]  # the steps trained


@pytest.mark.slow  # the module fixture: about 85 s (CPU inductor compile) on 2 cores
def test_compile_summary_logged_once_without_graph_breaks(runs):
    (ev,) = _records(runs["compiled"], "compile")
    assert ev["step"] == 1  # after the first log window
    assert ev["blocks"] == {"Block": 4, "BertLayer": 8}  # 2 ViT blocks and 4 BERT layers, online + momentum
    assert ev["graph_breaks"] == 0, ev["graph_break_reasons"]
    assert ev["graphs"] >= 1 and ev["frames"] >= ev["graphs"]
    assert ev["recompiles"] >= sum(ev["recompile_reasons"].values())
    assert ev["compile_time_s"] > 0
    assert not _records(runs["eager"], "compile")
    log = (runs["compiled"] / "metrics.jsonl").read_text()
    assert "_orig_mod" not in log


@pytest.mark.slow  # the module fixture: about 85 s (CPU inductor compile) on 2 cores
def test_state_dicts_and_checkpoints_interchange(runs):
    def state(run: Path, tag: str | None = None) -> dict:
        path = run / "checkpoint.pt" if tag is None else run / "checkpoints" / tag / "state.pt"
        return torch.load(path, map_location="cpu", weights_only=True)["model"]

    e5, c5 = state(runs["eager"], "step_00000005"), state(runs["compiled"], "step_00000005")
    assert list(c5) == list(e5)  # same keys in the same order
    ef, cf = state(runs["eager"]), state(runs["compiled"])
    assert list(cf) == list(ef) and not [k for k in cf if "_orig_mod" in k]
    assert_same_state(ef, cf)
    eager_l = _losses(runs["eager"])
    for name in ("compiled_to_eager", "eager_to_compiled"):
        resumed = _losses(runs[name])
        assert sorted(resumed) == list(range(6, STEPS + 1)), name
        worst = max(abs(resumed[s][k] - eager_l[s][k]) for s in resumed for k in LOSSES)
        assert worst <= 1e-5, (name, worst)
        assert_same_state(ef, state(runs[name]))


def _tiny_model() -> ALBEFPretrain:
    torch.manual_seed(0)
    return ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL)


def _batch():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(5, 50, (2, 7), generator=g)
    ids[:, 0] = SPECIAL["cls"]
    return image, ids, torch.ones(2, 7, dtype=torch.long)


def test_compile_keeps_names_and_momentum_pairing():
    model = _tiny_model()
    keys, params = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    moms, onlines = model.momentum_pairs()
    blocks = compile_blocks(model)
    assert blocks == {"Block": 4, "BertLayer": 8}
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == params
    moms2, onlines2 = model.momentum_pairs()
    assert [id(t) for t in moms2] == [id(t) for t in moms]
    assert [id(t) for t in onlines2] == [id(t) for t in onlines]
    assert model.visual_encoder.blocks[0]._compiled_call_impl is not None
    assert model.visual_encoder_m.blocks[0]._compiled_call_impl is not None
    assert model.text_encoder_m.bert.encoder.layer[3]._compiled_call_impl is not None
    with pytest.raises(ValueError, match="no ViT block or BERT layer"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_keep_attention_on_compiled_blocks_runs_eagerly_and_compiles_nothing():
    """Grad-CAM's explicit attention on a compiled model: the eager model's probabilities and gradients, and
    no graph compiled (the compiled SDPA graph must neither answer instead nor be traced into)."""
    ref, comp = _tiny_model(), _tiny_model()
    compile_blocks(comp)
    image, ids, mask = _batch()
    got = []
    counters = CompileCounters()
    for model in (ref, comp):
        model.eval()
        cross = model.text_encoder.bert.encoder.layer[3].crossattention
        for module in (cross, model.visual_encoder.blocks[1].attn):
            with keep_attention(module) as kept:
                embeds, _ = model.encode_image(image)
                states, _ = model.encode_text(ids, mask)
                fused = model.text_encoder.bert.fuse(states, mask, embeds)
                (grad,) = torch.autograd.grad(fused[:, 0].sum(), kept.probs)
            got.append((kept.probs.detach(), grad))
    assert counters.summary()["graphs"] == 0
    for (p_ref, g_ref), (p, g) in zip(got[:2], got[2:]):
        assert torch.equal(p, p_ref) and torch.equal(g, g_ref)


def test_eager_stance_runs_compiled_blocks_without_compiling():
    model = _tiny_model()
    compile_blocks(model)
    counters = CompileCounters()
    image, _, _ = _batch()
    with eager(), torch.no_grad():
        out = model.visual_encoder.forward_features(image)
    assert counters.summary()["graphs"] == 0
    ref = _tiny_model()
    with torch.no_grad():
        assert torch.equal(out, ref.visual_encoder.forward_features(image))


@pytest.mark.slow  # a 2-rank launch: about 30 s once the module fixture has compiled the graphs
def test_two_rank_deepspeed_step_compiled(runs, tmp_path):
    """Compiled blocks under DeepSpeed ZeRO-2 on 2 ranks: the step runs without a graph break, and the
    checkpoints hold the eager model's keys."""
    run = tmp_path / "ds"
    args = ["pretrain", "--config", CFG, *runs["args"], "train.engine=deepspeed", "train.compile=true"]
    args += [f"train.output_dir={run}", "train.max_steps=2", "train.save_every=2", "train.eval_at_end=false"]
    out = launch_deepspeed(2, args, threads=1)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    (ev,) = _records(run, "compile")
    assert ev["blocks"] == {"Block": 4, "BertLayer": 8} and ev["graph_breaks"] == 0, ev
    assert sorted(_losses(run)) == [1, 2]
    states = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    module = torch.load(states, map_location="cpu", weights_only=True)["module"]
    eager_keys = list(torch.load(runs["eager"] / "checkpoint.pt", weights_only=True)["model"])
    assert list(module) == eager_keys
    assert list(torch.load(run / "checkpoint.pt", weights_only=True)["model"]) == eager_keys
