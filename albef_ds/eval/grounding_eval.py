"""Distributed weakly-supervised grounding: every rank Grad-CAMs its contiguous share of the expressions,
picks a proposal per expression, and the predicted boxes are gathered with known counts, so each expression
is scored exactly once and 2 ranks predict what 1 process predicts.

Per expression (DOWNSTREAM_SPEC.md section 4): the Grad-CAM map of the image and the expression (`gradcam`:
the ITM variant on a fusion layer's cross-attention, or the ITC variant on a ViT block), upsampled to the
original image, each proposal scored by its heat / sqrt(area), the best one kept (`grounding.predict_box`,
computed afresh for every expression); a hit when its IoU with the ground-truth box is >= the threshold.
Accuracy per split (val / testA / testB as the refs name them) and over all expressions.

Baselines from the proposals alone (`proposal_baselines`): a uniformly random proposal (its expected
accuracy) and the largest proposal.

Pictures (`write_pictures`): the first expressions of the set (all in rank 0's share) drawn with their heat
map, chosen proposal and ground-truth box, one PNG each and a grid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .comm import LocalComm, shard_bounds
from .gradcam import itc_gradcam, itm_gradcam
from .grounding import HIT_IOU, iou, predict_box

log = logging.getLogger(__name__)

MIN_PICTURE_WIDTH = 384  # pixels: narrower images are drawn at an integer scale up to at least this
GRADCAM = {"itm": itm_gradcam, "itc": itc_gradcam}
GradCam = Callable[..., torch.Tensor]


def _gradcam(kind: str, layer: int | None) -> GradCam:
    if kind not in GRADCAM:
        raise ValueError(f"Grad-CAM kind must be one of {sorted(GRADCAM)}, got {kind!r}")
    key = "layer" if kind == "itm" else "block"
    return lambda model, *inputs: GRADCAM[kind](model, *inputs, **{key: layer})


def predict_boxes(
    model,
    eval_set,
    tokenizer,
    *,
    kind: str = "itm",
    layer: int | None = None,
    device: torch.device | str,
    batch_size: int,
    comm=None,
    num_workers: int = 0,
    progress: bool = False,
    keep_maps: int = 0,
) -> tuple[list[list[float]], list[torch.Tensor]]:
    """The proposal [x, y, w, h] each expression of `eval_set` (`GroundingEvalSet`) picks, in order, on
    every rank; and the (g, g) maps of the first `keep_maps` expressions (on the rank that holds them: rank
    0 when keep_maps <= its share). `model`: the bare module (Grad-CAM needs gradients, not an engine)."""
    comm = comm or LocalComm()
    cam_fn = _gradcam(kind, layer)
    bounds = shard_bounds(len(eval_set), comm.world_size, align=batch_size)
    start, end = bounds[comm.rank]
    boxes: list[list[float]] = []
    maps: list[torch.Tensor] = []
    with tqdm(total=end - start, desc="grounding", unit="expr", disable=not progress, leave=False) as bar:
        batches = eval_set.image_batches(
            start, end, batch_size=batch_size, device=device, num_workers=num_workers
        )
        for images, idx in batches:
            ids = idx.tolist()
            text = tokenizer([eval_set.texts[i] for i in ids])
            cams = cam_fn(
                model,
                images.to(device, non_blocking=True),
                text["input_ids"].to(device),
                text["attention_mask"].to(device),
            ).cpu()
            for i, cam in zip(ids, cams):
                w, h = eval_set.sizes[i]
                boxes.append(
                    predict_box(cam, eval_set.proposals[i], height=h, width=w, image_id=eval_set.image_ids[i])
                )
                if i < keep_maps:
                    maps.append(cam)
            bar.update(len(ids))
    if len(boxes) != end - start:
        raise RuntimeError(f"rank {comm.rank} grounded {len(boxes)} of its {end - start} expressions")
    local = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4).to(device)
    gathered = comm.gather_rows(local, [e - s for s, e in bounds]).cpu().tolist()
    return gathered, maps


def grounding_metrics(eval_set, pred_boxes: list[list[float]], *, threshold: float = HIT_IOU) -> dict:
    """{"accuracy": percent of hits over every expression, "expressions": n, "accuracy_<split>": percent,
    "expressions_<split>": n per split}."""
    if len(pred_boxes) != len(eval_set):
        raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(eval_set)} expressions")
    hits = np.asarray([iou(p, g) >= threshold for p, g in zip(pred_boxes, eval_set.boxes)], dtype=bool)
    splits = np.asarray(eval_set.splits)
    # Plain floats: the metrics go into checkpoints, which load with weights_only=True (no numpy scalars).
    out = {"accuracy": 100.0 * float(hits.mean()), "expressions": len(hits)}
    for s in eval_set.split_names:
        rows = hits[splits == s]
        out[f"accuracy_{s}"] = 100.0 * float(rows.mean())
        out[f"expressions_{s}"] = int(rows.size)
    return out


def proposal_baselines(eval_set, *, threshold: float = HIT_IOU) -> dict:
    """Accuracy (percent) of two model-free choices among each expression's proposals: a uniformly random
    proposal (expected value: the share of proposals that hit) and the largest one (first on ties)."""
    random_hit, largest_hit = [], []
    for i, (props, gt) in enumerate(zip(eval_set.proposals, eval_set.boxes)):
        if not len(props):
            raise ValueError(
                f"image {eval_set.image_ids[i]!r} ({eval_set.images[i]}) has no proposals: no baseline can "
                "pick a box for its expressions"
            )
        p = np.asarray(props, dtype=np.float64)[:, :4]
        ious = np.asarray(iou(p, np.asarray(gt, dtype=np.float64)))
        random_hit.append(float((ious >= threshold).mean()))
        largest_hit.append(bool(ious[int(np.argmax(p[:, 2] * p[:, 3]))] >= threshold))
    return {
        "random_proposal_accuracy": 100.0 * float(np.mean(random_hit)),
        "largest_box_accuracy": 100.0 * float(np.mean(largest_hit)),
    }


def write_pictures(eval_set, pred_boxes, maps, out_dir: str | Path, *, grid_name: str = "grid.png") -> Path:
    """PNGs of the first len(maps) expressions (image, heat map, chosen proposal, ground-truth box,
    expression) into out_dir/<index>_<ref_id>.png, plus a grid of them; returns the grid's path."""
    from .grounding_viz import GroundingExample, draw_grid, draw_grounding

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = []
    for i, cam in enumerate(maps):
        with Image.open(eval_set.images[i]) as im:
            image = im.convert("RGB")
        ex = GroundingExample(image, cam, pred_boxes[i], eval_set.boxes[i], eval_set.texts[i])
        path = out / f"{i:04d}_{eval_set.ref_ids[i]}.png"
        draw_grounding(ex.image, ex.heat, ex.pred_box, ex.gt_box, ex.text, path, scale=_scale(image))
        examples.append(ex)
    if not examples:
        raise ValueError("write_pictures needs at least one map")
    return draw_grid(examples, out / grid_name, scale=_scale(examples[0].image))


def _scale(image: Image.Image) -> int:
    # Small images are drawn enlarged, so that the title and the legend fit above them.
    return max(1, math.ceil(MIN_PICTURE_WIDTH / image.width))
