"""The retrieval module: same-id ITC targets, ITM negatives, the id queue, loading, data errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from albef_ds.data.karpathy import check_karpathy_eval, check_karpathy_train
from albef_ds.model import ALBEFPretrain
from albef_ds.model.retrieval import (
    NO_ID,
    ALBEFRetrieval,
    itc_loss_multi_positive,
    sample_negatives_excluding,
)
from albef_ds.model.weights import OUR_FORMAT
from albef_ds.train.checkpoint import load_weights
from tests.helpers import SPECIAL, tiny_model_config


def test_itc_targets_spread_over_same_id_candidates():
    g = torch.Generator().manual_seed(0)
    b, q, d = 4, 3, 8
    feat = F.normalize(torch.randn(b, d, generator=g), dim=1)
    feat_m = F.normalize(torch.randn(b, d, generator=g), dim=1)
    bank = F.normalize(torch.randn(b + q, d, generator=g), dim=1)
    idx = torch.tensor([7, 3, 7, 1])
    idx_all = torch.cat([idx, torch.tensor([3, NO_ID, 7])])
    pos = idx[:, None] == idx_all[None]
    temp, alpha = torch.tensor([0.1]), 0.3
    got = itc_loss_multi_positive(feat, feat_m, bank, pos, temp, alpha)
    # Brute force, row by row.
    total = 0.0
    for i in range(b):
        positives = [j for j in range(b + q) if int(idx_all[j]) == int(idx[i])]
        hard = torch.zeros(b + q)
        hard[positives] = 1.0 / len(positives)
        y = alpha * F.softmax(feat_m[i] @ bank.t() / 0.1, dim=0) + (1 - alpha) * hard
        total += -(y * F.log_softmax(feat[i] @ bank.t() / 0.1, dim=0)).sum()
    assert got.item() == pytest.approx((total / b).item(), rel=1e-5)
    assert pos[0].sum() == 3 and pos[3].sum() == 1  # row 0: itself, sample 2 and queue slot 2


def test_hard_negatives_never_share_the_image_id():
    idx = torch.tensor([0, 0, 1, 2, 2, 2, 3, 0])
    same = idx[:, None] == idx[None]
    sim = torch.randn(8, 8) * 5
    for seed in range(50):
        neg, ok = sample_negatives_excluding(sim, same, torch.Generator().manual_seed(seed))
        assert ok.all()
        assert not same[torch.arange(8), neg].any()
    # A batch of one image's captions has no negative at all: flagged, not silently a positive.
    _, ok = sample_negatives_excluding(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool))
    assert not ok.any()


def test_forward_backward_and_id_queue_ring():
    torch.manual_seed(0)
    model = ALBEFRetrieval(tiny_model_config(queue_size=5), special_tokens=SPECIAL)
    assert not any(k.startswith("text_encoder.cls.") for k in model.state_dict())
    img = torch.randn(4, 3, 32, 32)
    ids = torch.randint(5, 50, (4, 7))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    idx = torch.tensor([10, 11, 10, 12])
    out = model(img, ids, mask, alpha=0.4, idx=idx)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.temp.grad is not None
    model.enqueue(out.image_feat_m, out.text_feat_m, out.idx)
    assert model.idx_queue.tolist() == [10, 11, 10, 12, NO_ID] and int(model.queue_ptr) == 4
    assert torch.allclose(model.image_queue[:4], out.image_feat_m)
    model.enqueue(out.image_feat_m[:3], out.text_feat_m[:3], torch.tensor([20, 21, 22]))  # wraps
    assert model.idx_queue.tolist() == [21, 22, 10, 12, 20] and int(model.queue_ptr) == 2
    # Padded rows from a gather (rank with fewer samples) are skipped.
    model.all_gather = lambda x: (torch.cat([x, x]), torch.tensor([True, False, True, False]))
    model.enqueue(out.image_feat_m[:2], out.text_feat_m[:2], torch.tensor([30, 31]))
    assert model.idx_queue.tolist() == [21, 22, 30, 30, 20] and int(model.queue_ptr) == 4


def test_pretraining_checkpoint_loads_at_another_resolution(tmp_path):
    torch.manual_seed(0)
    pre = ALBEFPretrain(tiny_model_config(), special_tokens=SPECIAL)  # 32 px: 4x4 grid
    path = tmp_path / "pre.pt"
    torch.save({"albef_ds_format": OUR_FORMAT, "model": pre.state_dict()}, path)
    cfg = tiny_model_config(queue_size=7)
    cfg.vision.image_size = 48  # 6x6 grid
    model = ALBEFRetrieval(cfg, special_tokens=SPECIAL)
    rep = load_weights(model, path)
    assert model.visual_encoder.pos_embed.shape == (1, 37, 32)
    assert any("pos_embed" in c for c in rep.converted)
    assert torch.equal(model.text_proj.weight, pre.text_proj.weight)
    assert torch.equal(model.itm_head.weight, pre.itm_head.weight)
    assert (model.idx_queue == NO_ID).all()  # queue of another length: the model keeps its own
    # A released retrieval checkpoint's layout (BertModel keys, (D, Q) queues, (1, Q) ids, 0-dim temp).
    sd = {}
    for k, v in ALBEFRetrieval(tiny_model_config(queue_size=7), special_tokens=SPECIAL).state_dict().items():
        k = k.replace("text_encoder.bert.", "text_encoder.").replace(
            "text_encoder_m.bert.", "text_encoder_m."
        )
        sd[k] = v
    sd["image_queue"], sd["text_queue"] = sd["image_queue"].t(), sd["text_queue"].t()
    sd["idx_queue"] = torch.arange(7)[None]
    sd["temp"] = torch.tensor(0.05)
    torch.save({"model": sd}, tmp_path / "released.pth")
    model = ALBEFRetrieval(tiny_model_config(queue_size=7), special_tokens=SPECIAL)
    rep = load_weights(model, tmp_path / "released.pth")
    assert not rep.unexpected and model.idx_queue.tolist() == list(range(7))
    assert model.temp.item() == pytest.approx(0.05)
    assert torch.equal(
        model.text_encoder.bert.embeddings.word_embeddings.weight,
        sd["text_encoder.embeddings.word_embeddings.weight"],
    )


@pytest.mark.parametrize(
    "entry,msg",
    [
        ({"image": "a.jpg", "caption": "x"}, "has no field 'image_id'"),
        ({"image": "a.jpg", "caption": ["x"], "image_id": 1}, "field 'caption' must be one str"),
        ({"image": "", "caption": "x", "image_id": 1}, "field 'image' must be a non-empty str"),
        ({"image": "a.jpg", "caption": "x", "image_id": 1.5}, "field 'image_id' must be a str or an int"),
    ],
)
def test_karpathy_train_errors_name_file_entry_and_field(tmp_path, entry, msg):
    f = tmp_path / "train.json"
    f.write_text(json.dumps([{"image": "b.jpg", "caption": "y", "image_id": "b"}, entry]))
    with pytest.raises(ValueError, match=msg) as e:
        check_karpathy_train(f)
    assert str(f) in str(e.value) and "entry 1" in str(e.value)


@pytest.mark.parametrize(
    "entry,msg",
    [
        ({"image": "a.jpg"}, "has no field 'caption'"),
        ({"image": "a.jpg", "caption": "one string"}, "field 'caption' must be a non-empty list of str"),
        ({"image": "a.jpg", "caption": []}, "field 'caption' must be a non-empty list of str"),
    ],
)
def test_karpathy_eval_errors_name_file_entry_and_field(tmp_path, entry, msg):
    f = tmp_path / "test.json"
    f.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=msg) as e:
        check_karpathy_eval(f)
    assert str(f) in str(e.value) and "entry 0" in str(e.value)
