"""Grounding evaluation: IoU in the continuous [x, y, w, h] convention, proposal scoring on known heat maps,
the summed-area table against brute force, per-expression predictions, accuracy per split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from albef_ds.eval.grounding import (
    grounding_accuracy,
    iou,
    pick_box,
    pixel_bounds,
    predict_box,
    score_proposals,
    upsample_map,
)


@pytest.mark.parametrize(
    "a, b, want",
    [
        ([10, 20, 30, 40], [10, 20, 30, 40], 1.0),  # identical
        ([0, 0, 10, 10], [20, 20, 5, 5], 0.0),  # disjoint
        ([0, 0, 10, 10], [10, 0, 10, 10], 0.0),  # touching along an edge: no shared area
        ([0, 0, 10, 10], [10, 10, 4, 4], 0.0),  # touching at a corner
        ([0, 0, 10, 10], [2, 3, 4, 5], 20 / 100),  # nested: inner area / outer area
        ([0, 0, 10, 10], [5, 0, 10, 10], 50 / 150),  # half overlap
        ([0.5, 0.5, 2, 2], [1.5, 1.5, 2, 2], 1 / 7),  # fractional: 1 x 1 over 4 + 4 - 1
        ([3, 3, 0, 0], [3, 3, 0, 0], 0.0),  # zero areas
    ],
)
def test_iou_hand_computed(a, b, want):
    assert iou(a, b) == pytest.approx(want)
    assert iou(b, a) == pytest.approx(want)


def test_iou_broadcasts_and_rejects_bad_boxes():
    got = iou(np.array([[0, 0, 10, 10], [5, 0, 10, 10]]), [0, 0, 10, 10])
    np.testing.assert_allclose(got, [1.0, 1 / 3])
    assert iou(torch.tensor([0.0, 0, 4, 4]), torch.tensor([2.0, 0, 4, 4])) == pytest.approx(8 / 24)
    with pytest.raises(ValueError, match=">= 0"):
        iou([0, 0, -1, 2], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="x, y, w, h"):
        iou([0, 0, 1], [0, 0, 1, 1])


def test_pixel_centre_rule():
    got = pixel_bounds(
        [[2, 3, 4, 5], [2.5, 0, 1, 1], [2.6, 0, 0.8, 1], [2.4, 0, 1.2, 1], [-5, -5, 8, 100], [30, 0, 5, 5]],
        height=10,
        width=20,
    )
    assert got.tolist() == [
        [2, 3, 6, 8],  # integer box: exactly its pixels
        [2, 0, 3, 1],  # centre 2.5 lies on the box's left edge: inside
        [3, 0, 3, 1],  # covers no pixel centre: empty
        [2, 0, 4, 1],  # [2.4, 3.6) holds the centres 2.5 and 3.5
        [0, 0, 3, 10],  # clipped to the image
        [20, 0, 20, 5],  # outside: empty
    ]


def test_scores_on_a_hand_made_heat_map():
    heat = torch.zeros(10, 20)
    heat[2:6, 4:8] = 1.0  # a 4 x 4 block of ones at x 4..8, y 2..6
    boxes = [
        [4, 2, 4, 4],  # exactly the block: 16 / 4
        [0, 0, 20, 10],  # whole image: 16 / sqrt(200)
        [4, 2, 2, 2],  # a quarter of it: 4 / 2
        [10, 0, 5, 5],  # outside it: 0
        [18, 8, 10, 10],  # clipped to 2 x 2 pixels of zero heat: 0
        [25, 0, 3, 3],  # no pixel in the image: -inf
    ]
    got = score_proposals(heat, boxes)
    want = [4.0, 16 / math.sqrt(200), 2.0, 0.0, 0.0, float("-inf")]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want)
    assert pick_box(heat, boxes) == 0


def test_summed_area_table_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    h, w = 37, 53
    heat = torch.randn(h, w, generator=g, dtype=torch.float64)
    xy = torch.rand(500, 2, generator=g, dtype=torch.float64) * torch.tensor([w + 10.0, h + 10.0]) - 5
    wh = torch.rand(500, 2, generator=g, dtype=torch.float64) * torch.tensor([w / 2, h / 2])
    boxes = torch.cat([xy, wh], 1)
    boxes[:100] = boxes[:100].round()  # integer boxes too
    got = score_proposals(heat, boxes)
    for k, (x, y, bw, bh) in enumerate(boxes.tolist()):
        cols = [j for j in range(w) if x <= j + 0.5 < x + bw]
        rows = [i for i in range(h) if y <= i + 0.5 < y + bh]
        if not cols or not rows:
            assert got[k] == float("-inf")
            continue
        s = heat[rows][:, cols].sum().item()
        assert got[k].item() == pytest.approx(s / math.sqrt(len(rows) * len(cols)), rel=1e-9, abs=1e-9)
    assert torch.isfinite(got).sum() > 300


def test_pick_box_errors_name_the_image():
    heat = torch.rand(8, 8)
    with pytest.raises(ValueError, match="image 'COCO_42' has no proposals"):
        pick_box(heat, [], image_id="COCO_42")
    with pytest.raises(ValueError, match="image 7: none of its 2 proposals"):
        pick_box(heat, [[20, 20, 3, 3], [0, 0, 0.2, 0.2]], image_id=7)
    bad = heat.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pick_box(bad, [[0, 0, 4, 4]], image_id=7)


def test_prediction_is_fresh_for_every_expression():
    """No score above 0 is still a choice (the reference kept the previous expression's box then)."""
    boxes = [[0, 0, 4, 4], [4, 4, 4, 4]]
    first = torch.zeros(4, 4)
    first[2:, 2:] = 1.0  # picks box 1
    second = -torch.ones(4, 4)
    second[:2, :2] = -0.1  # every score negative; box 0 the least negative
    assert predict_box(first, boxes, height=8, width=8) == [4.0, 4.0, 4.0, 4.0]
    assert predict_box(second, boxes, height=8, width=8) == [0.0, 0.0, 4.0, 4.0]


def test_upsample_map_is_bicubic_without_corner_alignment():
    cam = torch.arange(16.0).view(4, 4)
    up = upsample_map(cam, 8, 12)
    assert up.shape == (8, 12) and up.dtype == torch.float32
    want = torch.nn.functional.interpolate(cam[None, None], size=(8, 12), mode="bicubic", align_corners=False)
    assert torch.equal(up, want[0, 0])
    torch.testing.assert_close(upsample_map(np.ones((3, 3)), 5, 7), torch.ones(5, 7))
    with pytest.raises(ValueError, match="2-D"):
        upsample_map(torch.ones(1, 3, 3), 4, 4)


def test_accuracy_per_split_with_counts():
    gt = [0, 0, 10, 10]
    records = [
        {"split": "testA", "pred_box": gt, "gt_box": gt},  # hit
        {"split": "testA", "pred_box": [5, 0, 10, 10], "gt_box": gt},  # IoU 1/3: miss
        {"split": "val", "pred_box": [0, 0, 10, 5], "gt_box": gt},  # IoU exactly 0.5: hit
        {"split": "testB", "pred_box": [50, 50, 3, 3], "gt_box": gt},
        {"split": "testA", "pred_box": [1, 1, 9, 9], "gt_box": gt},  # IoU 0.81: hit
    ]
    got = grounding_accuracy(records)
    assert list(got) == ["testA", "val", "testB"]
    assert got["testA"] == {"accuracy": pytest.approx(2 / 3), "hits": 2, "count": 3}
    assert got["val"] == {"accuracy": 1.0, "hits": 1, "count": 1}
    assert got["testB"] == {"accuracy": 0.0, "hits": 0, "count": 1}
    assert grounding_accuracy([]) == {}
