"""The VQA module: decoder initialisation from pre-trained and released checkpoints, the loss against a
per-sample loop, answer ranking against brute-force scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from albef_ds.model import ALBEFPretrain
from albef_ds.model.vqa import ALBEFVQA, answer_token_loss, decoder_layers
from albef_ds.model.weights import detect_layout, load_state
from tests.helpers import SPECIAL, tiny_model_config
from tests.model.test_weights import _to_released_layout

CLS, SEP, PAD = SPECIAL["cls"], 3, SPECIAL["pad"]


def _vqa(**kw) -> ALBEFVQA:
    return ALBEFVQA(tiny_model_config(**kw), special_tokens=SPECIAL)


def _pretrained() -> ALBEFPretrain:
    """A pre-training model whose momentum copies differ from the online weights (so a wrong _m map shows)."""
    src = ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL)
    with torch.no_grad():
        for b in src.buffers():
            if b.is_floating_point():
                b.add_(torch.randn_like(b))
    return src


def _check_decoder_from_encoder(dst: ALBEFVQA, src: ALBEFPretrain) -> None:
    f = src.cfg.text.fusion_layer
    depth = decoder_layers(src.cfg)
    assert depth == 2 and len(dst.text_decoder.bert.encoder.layer) == depth
    for sfx in ("", "_m"):
        enc, dec = getattr(src, "text_encoder" + sfx), getattr(dst, "text_decoder" + sfx)
        pairs = [
            (dec.bert.embeddings.state_dict(), enc.bert.embeddings.state_dict()),
            (dec.cls.state_dict(), enc.cls.state_dict()),
        ] + [
            (dec.bert.encoder.layer[j].state_dict(), enc.bert.encoder.layer[f + j].state_dict())
            for j in range(depth)
        ]
        for got, want in pairs:
            assert got.keys() == want.keys()
            for k in got:
                assert torch.equal(got[k], want[k]), (sfx, k)
        # The encoder keeps its own copy of every layer; nothing is shared with the decoder.
        ours_enc = getattr(dst, "text_encoder" + sfx)
        for k, v in enc.bert.state_dict().items():
            assert torch.equal(ours_enc.bert.state_dict()[k], v), (sfx, k)
    assert dst.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight is not (
        dst.text_encoder.bert.encoder.layer[f].crossattention.self.key.weight
    )
    for k in src.visual_encoder_m.state_dict():
        assert torch.equal(dst.visual_encoder_m.state_dict()[k], src.visual_encoder_m.state_dict()[k])
    # The LM head stays tied to the decoder's own embeddings.
    assert dst.text_decoder.cls.predictions.decoder.weight is (
        dst.text_decoder.bert.embeddings.word_embeddings.weight
    )


def test_decoder_starts_from_the_fusion_layers_of_our_checkpoint():
    src, dst = _pretrained(), _vqa()
    report = load_state(dst, src.state_dict(), layout="ours")
    assert report.missing == []
    assert any(c.startswith("text_decoder[_m] from text_encoder[_m]") for c in report.converted)
    assert any(k.startswith("text_encoder.cls.") for k in report.dropped)
    _check_decoder_from_encoder(dst, src)


def test_decoder_starts_from_the_fusion_layers_of_a_released_checkpoint():
    src = _pretrained()
    released = _to_released_layout(src.state_dict())  # ALBEF_4M.pth key names, (D, Q) queues, 0-dim temp
    assert "text_encoder.cls.predictions.decoder.bias" in released
    assert detect_layout(released, ours=False) == "albef"
    dst = _vqa()
    report = load_state(dst, released, layout="albef", source="ALBEF_4M.pth")
    assert report.missing == []
    _check_decoder_from_encoder(dst, src)


def test_a_released_vqa_checkpoint_keeps_its_own_decoder():
    """vqa.pth: a BertModel text encoder (`text_encoder.embeddings.*`) and a whole decoder."""
    src = _vqa()
    with torch.no_grad():
        for p in src.text_decoder.parameters():
            p.add_(1.0)
    sd = {
        k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m."): v
        for k, v in src.state_dict().items()
    }
    sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    dst = _vqa()
    report = load_state(dst, sd, layout=detect_layout(sd, ours=False), source="vqa.pth")
    assert report.missing == [] and report.unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_a_checkpoint_that_leaves_decoder_keys_missing_is_an_error():
    src = _pretrained()
    sd = dict(src.state_dict())
    del sd["text_encoder.bert.encoder.layer.3.crossattention.self.value.weight"]  # fusion layer 3 -> 1
    with pytest.raises(ValueError, match=r"text_decoder\.bert\.encoder\.layer\.1\.crossattention"):
        load_state(_vqa(), sd, layout="ours", source="partial.pt")
    vqa_sd = dict(_vqa().state_dict())
    del vqa_sd["text_decoder_m.bert.encoder.layer.0.output.dense.bias"]
    with pytest.raises(ValueError, match=r"text_decoder_m\.bert\.encoder\.layer\.0\.output\.dense\.bias"):
        load_state(_vqa(), vqa_sd, layout="ours")


# ---------------------------------------------------------------------------------------------- loss
def _batch(model: ALBEFVQA, b: int = 3, counts=(2, 1, 3)):
    """Questions of different lengths (padded), answers of different lengths (padded)."""
    vocab = model.cfg.text.vocab_size
    lq = [5, 3, 4][:b]
    ids = torch.full((b, max(lq)), PAD)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lq):
        ids[i, 0], ids[i, 1:n] = CLS, torch.randint(5, vocab, (n - 1,))
        mask[i, :n] = 1
    n_ans = sum(counts)
    la = torch.randint(1, 4, (n_ans,)) + 2  # [CLS] 1-3 pieces [SEP]
    a_ids = torch.full((n_ans, int(la.max())), PAD)
    a_mask = torch.zeros_like(a_ids)
    for a, n in enumerate(la.tolist()):
        a_ids[a, 0], a_ids[a, 1 : n - 1], a_ids[a, n - 1] = CLS, torch.randint(5, vocab, (n - 2,)), SEP
        a_mask[a, :n] = 1
    return {
        "image": torch.randn(b, 3, 32, 32),
        "input_ids": ids,
        "attention_mask": mask,
        "answer_ids": a_ids,
        "answer_mask": a_mask,
        "answer_weight": torch.rand(n_ans),
        "answer_count": torch.tensor(counts),
    }


def _loop_loss(model: ALBEFVQA, batch: dict, alpha: float) -> torch.Tensor:
    """The loss written per question, per answer, per token, on unpadded rows."""
    total, a = torch.zeros(()), 0
    for q in range(batch["image"].shape[0]):
        n = int(batch["attention_mask"][q].sum())
        args = (batch["image"][q : q + 1], batch["input_ids"][q : q + 1, :n], torch.ones(1, n))
        states, states_m = model.encode_question(*args), model.encode_question(*args, momentum=True)
        for _ in range(int(batch["answer_count"][q])):
            length = int(batch["answer_mask"][a].sum())
            toks = batch["answer_ids"][a : a + 1, :length]
            ones = torch.ones_like(toks)
            logits = model.decoder_logits(toks, ones, states, torch.ones(1, n))[0]
            logits_m = model.decoder_logits(toks, ones, states_m, torch.ones(1, n), momentum=True)[0]
            loss_a = torch.zeros(())
            for t in range(1, length):
                logp = F.log_softmax(logits[t - 1], dim=-1)
                soft = F.softmax(logits_m[t - 1], dim=-1)
                loss_a = loss_a + (1 - alpha) * -logp[toks[0, t]] + alpha * -(soft * logp).sum()
            total = total + batch["answer_weight"][a] * loss_a
            a += 1
    return total / batch["image"].shape[0]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_loss_equals_a_per_sample_loop(alpha):
    model = _vqa()
    with torch.no_grad():
        for b in model.buffers():
            b.add_(0.05 * torch.randn_like(b))  # a teacher that differs from the student
    batch = _batch(model)
    out = model(**batch, alpha=alpha)
    torch.testing.assert_close(out.loss, _loop_loss(model, batch, alpha), rtol=1e-5, atol=1e-5)
    assert out.answer_loss.shape == (6,)
    out.loss.backward()
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight.grad.abs().sum() > 0
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_answer_token_loss_ignores_padding_and_mixes_the_teacher():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 2, 0], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    soft = torch.softmax(torch.randn(2, 3, 7), -1)
    got = answer_token_loss(logits, targets, mask, soft, 0.25)
    logp = logits.log_softmax(-1)
    want0 = sum(0.75 * -logp[0, t, targets[0, t]] - 0.25 * (soft[0, t] * logp[0, t]).sum() for t in (0, 1))
    want1 = 0.75 * -logp[1, 0, 3] - 0.25 * (soft[1, 0] * logp[1, 0]).sum()
    torch.testing.assert_close(got, torch.stack([want0, want1]))


# ------------------------------------------------------------------------------------------- ranking
def _answer_list(model: ALBEFVQA, n: int = 12):
    vocab = model.cfg.text.vocab_size
    rows = []
    while len(rows) < n:
        row = [CLS, *torch.randint(5, vocab, (int(torch.randint(1, 4, ())),)).tolist(), SEP]
        if row not in rows:
            rows.append(row)
    ids = torch.full((n, max(map(len, rows))), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def _brute_force(model, batch, a_ids, a_mask, double_count=False):
    """(B, A) scores of every answer, each scored on its own."""
    b, a = batch["input_ids"].shape[0], a_ids.shape[0]
    scores = torch.empty(b, a)
    with torch.no_grad():
        for q in range(b):
            n = int(batch["attention_mask"][q].sum())
            states = model.encode_question(
                batch["image"][q : q + 1], batch["input_ids"][q : q + 1, :n], torch.ones(1, n)
            )
            start = torch.tensor([[CLS]])
            first = model.decoder_logits(start, torch.ones_like(start), states, torch.ones(1, n))[0, 0]
            p_first = first.softmax(-1)
            for j in range(a):
                length = int(a_mask[j].sum())
                toks = a_ids[j : j + 1, :length]
                logp = model.decoder_logits(toks, torch.ones_like(toks), states, torch.ones(1, n))[0]
                logp = logp.log_softmax(-1)
                ll = sum(logp[t - 1, toks[0, t]] for t in range(1, length))
                scores[q, j] = ll + (p_first[toks[0, 1]].log() if double_count else 0.0)
    return scores


@pytest.mark.parametrize("double_count", [False, True])
def test_ranking_the_whole_list_equals_brute_force(double_count):
    model = _vqa().eval()
    batch = _batch(model)
    a_ids, a_mask = _answer_list(model)
    want = _brute_force(model, batch, a_ids, a_mask, double_count)
    for chunk in (5, 2048):  # candidates split across decoder passes, or in one
        got, score = model.rank_answers(
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            a_ids,
            a_mask,
            k=len(a_ids),
            double_count=double_count,
            chunk=chunk,
        )
        assert got.tolist() == want.argmax(1).tolist()
        torch.testing.assert_close(score, want.max(1).values, rtol=1e-5, atol=1e-5)


def test_ranking_with_a_small_k_differs_only_outside_the_top_k():
    torch.manual_seed(3)
    model = _vqa().eval()
    batch = _batch(model, b=3)
    batch = {**batch, "image": torch.randn(3, 3, 32, 32)}
    a_ids, a_mask = _answer_list(model, 16)
    brute = _brute_force(model, batch, a_ids, a_mask).argmax(1)
    k = 4
    got, _ = model.rank_answers(
        batch["image"], batch["input_ids"], batch["attention_mask"], a_ids, a_mask, k=k
    )
    with torch.no_grad():
        states = model.encode_question(batch["image"], batch["input_ids"], batch["attention_mask"])
        start = torch.full((3, 1), CLS)
        first = model.decoder_logits(start, torch.ones_like(start), states, batch["attention_mask"])[:, 0]
        top = first.softmax(-1)[:, a_ids[:, 1]].topk(k, dim=1).indices
    inside = 0
    for q in range(3):
        assert int(got[q]) in top[q].tolist()
        if int(brute[q]) in top[q].tolist():
            assert int(got[q]) == int(brute[q])
            inside += 1
    assert inside >= 1  # the case under test occurs
