"""ITM hard negatives, MLM masking and position selection, queue ring buffer, momentum model."""

from __future__ import annotations

import pytest
import torch

from albef_ds.model import ALBEFPretrain
from albef_ds.model.losses import (
    itm_loss,
    mask_tokens,
    mlm_capacity,
    sample_hard_negatives,
    select_scored_positions,
)
from albef_ds.train.schedule import param_groups
from tests.helpers import SPECIAL, tiny_model_config


def test_hard_negative_is_never_the_positive_and_follows_softmax():
    b = 5
    sim = torch.randn(b, b) * 2
    counts = torch.zeros(b, b)
    gen = torch.Generator().manual_seed(1)
    reps = 8000
    for _ in range(reps):
        j = sample_hard_negatives(sim, generator=gen)
        counts[torch.arange(b), j] += 1
    assert counts.diagonal().sum() == 0, "a negative was drawn on the diagonal"
    probs = sim.clone()
    probs.fill_diagonal_(float("-inf"))
    probs = torch.softmax(probs, dim=1)
    freq = counts / reps
    # Binomial standard error is at most 0.5/sqrt(8000) = 0.0056; allow 5 of them.
    assert (freq - probs).abs().max() < 0.03, (freq, probs)


def test_hard_negatives_need_two_samples_and_tolerate_extreme_logits():
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))
    sim = torch.tensor([[1000.0, -1000.0], [5000.0, 1e4]])  # softmax of these overflows in fp16
    assert sample_hard_negatives(sim).tolist() == [1, 0]
    half = sample_hard_negatives(sim.half())
    assert half.tolist() == [1, 0]


def test_itm_labels():
    logits = torch.zeros(9, 2)
    logits[:3, 1] = 10.0  # positives say "match"
    logits[3:, 0] = 10.0  # negatives say "no match"
    assert itm_loss(logits, 3).item() < 1e-3
    assert itm_loss(logits.flip(1), 3).item() > 5


def test_mask_token_statistics():
    b, length, vocab = 400, 40, 1000
    ids = torch.randint(5, vocab, (b, length))
    ids[:, 0] = SPECIAL["cls"]
    lengths = torch.randint(5, length + 1, (b,))
    pad = torch.arange(length)[None] >= lengths[:, None]
    ids[pad] = SPECIAL["pad"]
    gen = torch.Generator().manual_seed(3)
    masked, labels = mask_tokens(
        ids,
        vocab_size=vocab,
        mask_token_id=SPECIAL["mask"],
        pad_token_id=0,
        cls_token_id=2,
        probability=0.15,
        generator=gen,
    )
    chosen = labels != -100
    maskable = (ids != 0) & (ids != 2)
    assert not (chosen & ~maskable).any(), "PAD or CLS was masked"
    assert (labels[chosen] == ids[chosen]).all()
    rate = chosen.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.01
    n = chosen.sum().item()
    to_mask = (masked == SPECIAL["mask"]) & chosen
    unchanged = (masked == ids) & chosen
    replaced = chosen & ~to_mask & ~unchanged
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    # A random replacement may draw the original token (1/vocab): still about 10% each.
    assert abs(unchanged.sum().item() / n - 0.1) < 0.015
    assert abs(replaced.sum().item() / n - 0.1) < 0.015
    assert (masked[~chosen] == ids[~chosen]).all()


def test_select_scored_positions_matches_boolean_indexing_and_caps():
    labels = torch.full((3, 7), -100)
    labels[0, 2], labels[1, 0], labels[1, 6], labels[2, 3] = 11, 12, 13, 14
    idx, sel = select_scored_positions(labels, capacity=6)
    flat = labels.reshape(-1)
    want = torch.nonzero(flat != -100).squeeze(1)
    assert idx[:4].tolist() == want.tolist()
    assert sel.tolist() == [11, 12, 13, 14, -100, -100]
    idx2, sel2 = select_scored_positions(labels, capacity=2)  # overflow: the first two are kept
    assert idx2.tolist() == want[:2].tolist() and sel2.tolist() == [11, 12]
    assert mlm_capacity(1000, 0.15) >= 150 + 6 * (1000 * 0.15 * 0.85) ** 0.5
    assert mlm_capacity(10, 0.15) == 10


def _model(**kw):
    return ALBEFPretrain(tiny_model_config(**kw), special_tokens=SPECIAL)


def test_queue_wraps_for_batches_that_do_not_divide_it():
    m = _model(queue_size=10, embed_dim=4)
    seen_i, seen_t = [], []
    for step in range(5):  # 5 x 3 = 15 entries through a 10-slot ring
        fi = torch.full((3, 4), float(step * 3)) + torch.arange(3.0)[:, None]
        ft = -fi
        m.enqueue(fi, ft)
        seen_i += fi.tolist()
        seen_t += ft.tolist()
    assert m.queue_ptr.item() == 15 % 10
    # Slot s holds the newest entry e with e % 10 == s.
    for s in range(10):
        newest = max(e for e in range(15) if e % 10 == s)
        assert m.image_queue[s].tolist() == seen_i[newest]
        assert m.text_queue[s].tolist() == seen_t[newest]


def test_queue_global_batch_larger_than_queue_keeps_newest():
    m = _model(queue_size=4, embed_dim=2)
    m.queue_ptr.fill_(3)
    feats = torch.arange(14.0).reshape(7, 2)
    m.enqueue(feats, feats)
    assert m.queue_ptr.item() == (3 + 7) % 4
    # Entries 3..6 (the newest four) went to slots (3 + 3 + i) % 4.
    for i, e in enumerate(range(3, 7)):
        assert m.image_queue[(6 + i) % 4].tolist() == feats[e].tolist()


def test_queue_uses_injected_gather_once_per_enqueue():
    calls = []

    def fake_world_of_two(x):  # stands in for a 2-rank all_gather: [rank0; rank1]
        calls.append(x.shape)
        return torch.cat([x, x + 100])

    m = ALBEFPretrain(
        tiny_model_config(queue_size=8, embed_dim=3), special_tokens=SPECIAL, all_gather=fake_world_of_two
    )
    f = torch.ones(2, 3)
    m.enqueue(f, 2 * f)
    assert calls == [(2, 6)]  # one collective for image and text together
    assert m.queue_ptr.item() == 4
    assert m.image_queue[2].tolist() == [101.0] * 3 and m.text_queue[3].tolist() == [102.0] * 3


@pytest.mark.parametrize("queue_size,rows", [(8, 6), (10, 10), (7, 4), (5, 12)])
def test_padded_gather_enqueues_exactly_the_valid_rows(queue_size, rows):
    """A gather that marks padded rows (ranks with dropped images) fills the ring as if only the valid rows
    had been gathered; with rows <= queue size this runs without a host sync, otherwise by selection."""
    g = torch.Generator().manual_seed(queue_size * 100 + rows)
    state = {}

    def padded(x):
        return x, state["valid"]

    def exact(x):
        return x[state["valid"]]

    cfg = tiny_model_config(queue_size=queue_size, embed_dim=3)
    a = ALBEFPretrain(cfg, special_tokens=SPECIAL, all_gather=padded)
    b = ALBEFPretrain(cfg, special_tokens=SPECIAL, all_gather=exact)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        state["valid"] = torch.rand(rows, generator=g) < 0.7
        fi, ft = torch.randn(rows, 3, generator=g), torch.randn(rows, 3, generator=g)
        a.enqueue(fi, ft)
        b.enqueue(fi, ft)
        assert a.queue_ptr.item() == b.queue_ptr.item()
        assert torch.equal(a.image_queue, b.image_queue) and torch.equal(a.text_queue, b.text_queue)


def test_momentum_is_ema_gets_no_grad_and_is_not_optimised():
    m = _model()
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.split(".")[0].endswith("_m") for n in names)
    opt_params = {id(p) for g in param_groups(m, 0.02) for p in g["params"]}
    moms, onlines = m.momentum_pairs()
    assert all(id(b) not in opt_params for b in moms)
    assert len(moms) == len(onlines) == len(names) - 3  # all but temp and itm_head.{weight,bias}
    # Each online parameter except temp and itm_head (weight, bias) has a momentum twin.
    assert {n for n in names if not n.startswith(("temp", "itm_head"))} == {
        n for n, p in m.named_parameters() if any(p is o for o in onlines)
    }
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    before = [b.clone() for b in moms]
    m.momentum_update()
    mom = m.cfg.momentum
    for b0, b1, p in zip(before, moms, onlines):
        torch.testing.assert_close(b1, mom * b0 + (1 - mom) * p.detach(), rtol=0, atol=1e-6)
    # Tied MLM decoder stays tied in the momentum copy.
    tm = m.text_encoder_m
    assert tm.cls.predictions.decoder.weight is tm.bert.embeddings.word_embeddings.weight


def test_albef_base_has_the_papers_size():
    from pathlib import Path

    from albef_ds.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs/pretrain_4m.yaml", ["model.vit_init=", "model.bert_init="])
    m = ALBEFPretrain(cfg.model, special_tokens={"pad": 0, "cls": 101, "mask": 103})
    trainable = sum(p.numel() for p in m.parameters())
    assert 209e6 < trainable < 211e6  # about 210M (ViT-B/16 86M + BERT-base 110M + 6 cross-attentions 14M)
    assert m.visual_encoder.pos_embed.shape == (1, 1 + 16 * 16, 768)  # 256 px
    assert m.image_queue.shape == (65536, 256)
    moms, onlines = m.momentum_pairs()
    assert sum(b.numel() for b in moms) == trainable - 1 - 2 * 768 - 2  # all but temp and the ITM head
