"""Weakly-supervised grounding evaluation (RefCOCO+): box overlap, proposal scoring, accuracy per split.

Pure tensor / numpy code; the Grad-CAM maps come from `gradcam.py`.

Box convention (one, everywhere): [x, y, w, h] in pixels, as COCO and the MAttNet proposals give them, in
continuous image coordinates: a box covers [x, x + w) x [y, y + h), pixel (row i, column j) covers
[j, j + 1) x [i, i + 1), and a box's area is w * h. `iou` works in that convention throughout (the
reference mixed +1 "inclusive pixel" intersections with w * h areas).

Scoring a proposal on a heat map (H, W) needs whole pixels. Rule: a pixel belongs to a box when its centre
(j + 0.5, i + 0.5) lies inside [x, x + w) x [y, y + h), i.e. columns ceil(x - 0.5) .. ceil(x + w - 0.5) - 1;
the range is clipped to the image. For integer boxes inside the image these are exactly the pixels the box
covers. Score = (sum of the heat over those pixels) / sqrt(their number), which is sum / sqrt(w * h) for an
integer box inside the image; a box with no pixel left scores -inf.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

HIT_IOU = 0.5  # a prediction is a hit when its IoU with the ground-truth box is at least this


def iou(a, b) -> float | np.ndarray:
    """Intersection over union of [x, y, w, h] boxes (..., 4) and (..., 4), broadcast; a float for two
    single boxes. Boxes that only touch have IoU 0; two boxes of zero area have IoU 0."""
    a, b = (np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t, np.float64) for t in (a, b))
    if a.shape[-1:] != (4,) or b.shape[-1:] != (4,):
        raise ValueError(f"boxes must be [x, y, w, h] (..., 4), got shapes {a.shape} and {b.shape}")
    if (a[..., 2:] < 0).any() or (b[..., 2:] < 0).any():
        raise ValueError("box widths and heights must be >= 0")
    ax, ay, aw, ah = np.moveaxis(a, -1, 0)
    bx, by, bw, bh = np.moveaxis(b, -1, 0)
    iw = np.clip(np.minimum(ax + aw, bx + bw) - np.maximum(ax, bx), 0.0, None)
    ih = np.clip(np.minimum(ay + ah, by + bh) - np.maximum(ay, by), 0.0, None)
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    out = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(out) if out.ndim == 0 else out


def upsample_map(cam, height: int, width: int) -> torch.Tensor:
    """A (g, g) Grad-CAM map -> (height, width) fp32, bicubic with align_corners=False (the reference's)."""
    cam = torch.as_tensor(cam).detach().float()
    if cam.dim() != 2:
        raise ValueError(f"the map must be 2-D (g, g), got shape {tuple(cam.shape)}")
    up = F.interpolate(cam[None, None], size=(int(height), int(width)), mode="bicubic", align_corners=False)
    return up[0, 0]


def _as_boxes(boxes) -> torch.Tensor:
    """Any (P, 4) boxes (list, numpy, tensor on any device) -> CPU fp64 (P, 4); an empty input -> (0, 4)."""
    if isinstance(boxes, torch.Tensor):
        b = boxes.detach().to("cpu", torch.float64)
    else:
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float64))
    if b.numel() == 0:
        return torch.zeros(0, 4, dtype=torch.float64)
    if b.dim() != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be [x, y, w, h] rows (P, 4), got shape {tuple(b.shape)}")
    return b


def pixel_bounds(boxes, height: int, width: int) -> torch.Tensor:
    """(P, 4) [x, y, w, h] -> (P, 4) int64 [col0, row0, col1, row1], half-open pixel ranges by the
    pixel-centre rule of the module docstring, clipped to the (height, width) image."""
    b = _as_boxes(boxes)
    x0 = torch.ceil(b[:, 0] - 0.5)
    y0 = torch.ceil(b[:, 1] - 0.5)
    x1 = torch.ceil(b[:, 0] + b[:, 2] - 0.5)
    y1 = torch.ceil(b[:, 1] + b[:, 3] - 0.5)
    cols = torch.stack([x0, x1]).clamp(0, width).long()
    rows = torch.stack([y0, y1]).clamp(0, height).long()
    x1 = torch.maximum(cols[1], cols[0])  # an inverted range is an empty one
    y1 = torch.maximum(rows[1], rows[0])
    return torch.stack([cols[0], rows[0], x1, y1], dim=1)


def score_proposals(heat, boxes) -> torch.Tensor:
    """Scores (P,) fp64 of proposals [x, y, w, h] (P, 4) on a heat map (H, W): the heat summed over the
    box's pixels / sqrt(their number), -inf for a box with no pixel in the image (module docstring).

    One summed-area table, then four look-ups per box: O(H W + P)."""
    heat = torch.as_tensor(heat).detach().to("cpu", torch.float64)
    if heat.dim() != 2:
        raise ValueError(f"the heat map must be 2-D (H, W), got shape {tuple(heat.shape)}")
    h, w = heat.shape
    integral = torch.zeros(h + 1, w + 1, dtype=torch.float64)  # integral[i, j] = heat[:i, :j].sum()
    integral[1:, 1:] = heat.cumsum(0).cumsum(1)
    c0, r0, c1, r1 = pixel_bounds(boxes, h, w).unbind(1)
    sums = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = ((c1 - c0) * (r1 - r0)).to(torch.float64)
    return torch.where(area > 0, sums / area.clamp(min=1).sqrt(), torch.full_like(sums, float("-inf")))


def pick_box(heat, boxes, *, image_id=None) -> int:
    """Index of the best-scoring proposal (the first of equal best ones). Nothing is carried over from an
    earlier call. A ValueError naming `image_id` when the image has no proposal, none with a pixel in the
    image, or the scores are NaN."""
    boxes = _as_boxes(boxes)
    if boxes.shape[0] == 0:
        raise ValueError(f"image {image_id!r} has no proposals to choose from")
    scores = score_proposals(heat, boxes)
    if torch.isnan(scores).any():
        raise ValueError(f"image {image_id!r}: proposal scores are NaN (a NaN in the heat map)")
    if torch.isneginf(scores).all():
        raise ValueError(
            f"image {image_id!r}: none of its {boxes.shape[0]} proposals covers a pixel of the image"
        )
    return int(scores.argmax())


def predict_box(cam, boxes, *, height: int, width: int, image_id=None) -> list[float]:
    """The proposal [x, y, w, h] a (g, g) Grad-CAM map picks on an image of (height, width): the map
    upsampled to the image, then `pick_box`. Computed afresh for every expression."""
    heat = upsample_map(cam, height, width)
    b = _as_boxes(boxes)
    return b[pick_box(heat, b, image_id=image_id)].tolist()


def grounding_accuracy(records: Iterable[Mapping], *, threshold: float = HIT_IOU) -> dict[str, dict]:
    """Accuracy per split of records {"split", "pred_box", "gt_box"} (boxes [x, y, w, h]); a hit when
    IoU(pred, gt) >= threshold. Returns {split: {"accuracy", "hits", "count"}} for every split that
    appears (e.g. val / testA / testB), in order of first appearance."""
    out: dict[str, dict] = {}
    for r in records:
        s = out.setdefault(str(r["split"]), {"accuracy": 0.0, "hits": 0, "count": 0})
        s["count"] += 1
        s["hits"] += int(iou(r["pred_box"], r["gt_box"]) >= threshold)
    for s in out.values():
        s["accuracy"] = s["hits"] / s["count"]
    return out
