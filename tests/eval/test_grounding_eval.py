"""grounding_eval.py on a generated grounding set and a tiny random model: the boxes `predict_boxes` picks
equal a per-expression loop of Grad-CAM + `predict_box` (any batch size, kept maps), the metrics per split
and the proposal baselines equal hand counts, a view of the first expressions, and the pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.config import GroundingSynthConfig, VisionConfig
from albef_ds.data import TextTokenizer
from albef_ds.data.grounding import GroundingEvalSet
from albef_ds.data.synth import train_wordpiece_vocab
from albef_ds.data.synth_grounding import WORDS, generate_synthetic_grounding
from albef_ds.eval.gradcam import itc_gradcam, itm_gradcam
from albef_ds.eval.grounding import iou, predict_box
from albef_ds.eval.grounding_eval import (
    grounding_metrics,
    predict_boxes,
    proposal_baselines,
    write_pictures,
)
from albef_ds.model.retrieval import ALBEFRetrieval
from tests.helpers import tiny_model_config

IMAGE = 32  # model input side


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding_eval")
    cfg = GroundingSynthConfig(
        out_dir=str(root / "set"),
        num_train_images=4,
        num_val_images=4,
        num_test_images=6,
        image_size=48,
        num_proposals=6,
        seed=3,
    )
    out = generate_synthetic_grounding(cfg, progress=False)
    vocab = train_wordpiece_vocab([" ".join(sorted(WORDS))] * 4, root / "vocab.txt", vocab_size=50)
    tok = TextTokenizer.from_path(vocab, max_tokens=16)
    es = GroundingEvalSet(
        out / "test.json",
        refs=out / "refs.json",
        proposals=out / "proposals.json",
        image_size=IMAGE,
        max_words=30,
    )
    torch.manual_seed(0)
    model = ALBEFRetrieval(
        tiny_model_config(vision=VisionConfig(image_size=IMAGE, patch_size=8, width=32, depth=2, heads=2)),
        special_tokens={"pad": tok.pad_token_id, "cls": tok.cls_token_id, "mask": tok.mask_token_id},
    )
    return es, tok, model


def _one_by_one(model, es, tok, cam_fn, **kw):
    images = torch.cat([x for x, _ in es.image_batches(0, len(es), batch_size=len(es))])
    out = []
    for i in range(len(es)):
        text = tok([es.texts[i]])
        cam = cam_fn(model, images[i : i + 1], text["input_ids"], text["attention_mask"], **kw)[0]
        w, h = es.sizes[i]
        out.append(predict_box(cam, es.proposals[i], height=h, width=w))
    return out


@pytest.mark.parametrize("batch_size", [1, 5])
def test_predict_boxes_equals_the_per_expression_loop(setup, batch_size):
    es, tok, model = setup
    want = _one_by_one(model, es, tok, itm_gradcam, layer=3)
    got, maps = predict_boxes(model, es, tok, layer=3, device="cpu", batch_size=batch_size, keep_maps=3)
    assert len(got) == len(es) > 10
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert len(maps) == 3 and maps[0].shape == (4, 4)
    # every chosen box is one of the expression's proposals
    for box, props in zip(got, es.proposals):
        assert any(np.allclose(box, p[:4]) for p in props)
    # the ITC variant goes through the same path
    itc = _one_by_one(model, es, tok, itc_gradcam, block=1)
    got_itc, _ = predict_boxes(model, es, tok, kind="itc", layer=1, device="cpu", batch_size=batch_size)
    np.testing.assert_allclose(np.asarray(got_itc), np.asarray(itc), atol=1e-6)
    with pytest.raises(ValueError, match="Grad-CAM kind"):
        predict_boxes(model, es, tok, kind="xyz", device="cpu", batch_size=4)


def test_metrics_per_split_and_baselines_by_hand(setup):
    es, _, _ = setup
    assert set(es.split_names) == {"testA", "testB"}
    perfect = grounding_metrics(es, [list(b) for b in es.boxes])
    assert perfect["accuracy"] == 100.0 and perfect["expressions"] == len(es)
    first = [list(p[0][:4]) for p in es.proposals]
    m = grounding_metrics(es, first)
    for split in es.split_names:
        rows = [i for i, s in enumerate(es.splits) if s == split]
        hits = sum(iou(first[i], es.boxes[i]) >= 0.5 for i in rows)
        assert m[f"accuracy_{split}"] == pytest.approx(100.0 * hits / len(rows))
        assert m[f"expressions_{split}"] == len(rows)
    assert all(type(v) in (int, float) for v in m.values())  # checkpoint metadata: no numpy scalars
    base = proposal_baselines(es)
    rand, largest = [], []
    for props, gt in zip(es.proposals, es.boxes):
        hits = [iou(p[:4], gt) >= 0.5 for p in props]
        rand.append(sum(hits) / len(hits))
        areas = [p[2] * p[3] for p in props]
        largest.append(hits[areas.index(max(areas))])
    assert base["random_proposal_accuracy"] == pytest.approx(100.0 * sum(rand) / len(rand))
    assert base["largest_box_accuracy"] == pytest.approx(100.0 * sum(largest) / len(largest))
    with pytest.raises(ValueError, match="predicted boxes"):
        grounding_metrics(es, first[:-1])
    bare = es.head(2)
    bare.proposals = [bare.proposals[0], []]
    with pytest.raises(ValueError, match=f"image {bare.image_ids[1]!r} .* has no proposals"):
        proposal_baselines(bare)


def test_head_view_and_pictures(setup, tmp_path: Path):
    es, tok, model = setup
    head = es.head(3)
    assert len(head) == 3 and len(es) > 3
    assert head.texts == es.texts[:3] and head.boxes == es.boxes[:3] and head.images == es.images[:3]
    boxes, maps = predict_boxes(model, head, tok, device="cpu", batch_size=2, keep_maps=3)
    grid = write_pictures(head, boxes, maps, tmp_path / "pics")
    pngs = sorted(p.name for p in (tmp_path / "pics").glob("0*.png"))
    assert pngs == [f"{i:04d}_{head.ref_ids[i]}.png" for i in range(3)]
    with Image.open(tmp_path / "pics" / pngs[0]) as im:
        assert im.width >= 384  # 48 px images drawn enlarged so the title fits
        assert np.asarray(im).std() > 10
    with Image.open(grid) as im:
        assert im.width == 3 * 320
