"""Distributed classification accuracy (SNLI-VE, NLVR2): every rank classifies its contiguous share of a
split, the predictions are gathered with known counts, and every rank scores all of them.

The shares are `shard_bounds` cut at multiples of the batch size, so each example is counted exactly once
(the reference's padded samplers counted some twice) and 2 ranks predict what 1 process predicts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm import tqdm

from .comm import LocalComm, shard_bounds

log = logging.getLogger(__name__)

# (model, images..., input_ids, attention_mask) -> (B, C) logits
LogitsFn = Callable[..., torch.Tensor]


@torch.no_grad()
def predict_classes(
    model,
    eval_set,
    tokenizer,
    logits_fn: LogitsFn,
    *,
    device: torch.device | str,
    batch_size: int,
    comm=None,
    num_workers: int = 0,
    progress: bool = False,
) -> list[int]:
    """The predicted class of every example of `eval_set` (`.sentences`, `image_batches` yielding (images...,
    indices)), in order, on every rank."""
    comm = comm or LocalComm()
    bounds = shard_bounds(len(eval_set), comm.world_size, align=batch_size)
    start, end = bounds[comm.rank]
    dtype = next(model.visual_encoder.parameters()).dtype
    was_training = model.training
    model.eval()
    preds = []
    try:
        with tqdm(total=end - start, desc="classify", unit="ex", disable=not progress, leave=False) as bar:
            batches = eval_set.image_batches(
                start, end, batch_size=batch_size, device=device, num_workers=num_workers
            )
            for *images, idx in batches:
                text = tokenizer([eval_set.sentences[i] for i in idx.tolist()])
                logits = logits_fn(
                    model,
                    *(x.to(device, dtype, non_blocking=True) for x in images),
                    text["input_ids"].to(device),
                    text["attention_mask"].to(device),
                )
                preds.append(logits.argmax(1))
                bar.update(len(idx))
    finally:
        model.train(was_training)
    local = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)
    if local.shape[0] != end - start:
        raise RuntimeError(f"rank {comm.rank} classified {local.shape[0]} of its {end - start} examples")
    return comm.gather_rows(local.long(), [e - s for s, e in bounds]).cpu().tolist()


def accuracy(preds: list[int], labels: list[int]) -> dict:
    """{"accuracy": percent correct, "examples": n} (and the per-class accuracy `accuracy_class<c>`)."""
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    out = {
        "accuracy": 100.0 * sum(p == y for p, y in zip(preds, labels)) / len(labels),
        "examples": len(labels),
    }
    for c in sorted(set(labels)):
        rows = [p for p, y in zip(preds, labels) if y == c]
        out[f"accuracy_class{c}"] = 100.0 * sum(p == c for p in rows) / len(rows)
    return out
