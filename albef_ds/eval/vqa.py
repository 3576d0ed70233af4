"""Distributed VQA inference: every rank ranks the answer list for its contiguous share of the questions.

The questions are cut into `shard_bounds` shares at multiples of the batch size (no padded duplicates, and
each rank's batches are exactly those one process forms, so 2 ranks predict what 1 process predicts); each
rank answers its share with `ALBEFVQA.rank_answers` (first-token top-k, then sequence log-likelihood) and
the answer indices are gathered with known counts, so every question is answered exactly once and every
rank ends with all of them.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from .comm import LocalComm, shard_bounds

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_answers(
    model,
    eval_set,
    tokenizer,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    *,
    device: torch.device | str,
    batch_size: int,
    k: int,
    double_count: bool = False,
    chunk: int = 2048,
    comm=None,
    num_workers: int = 0,
    progress: bool = False,
) -> list[int]:
    """The index into the answer list of every question of `eval_set` (a `data.vqa.VQAEvalSet`), in order,
    on every rank. `tokenizer` tokenises the (already cleaned) questions; answer_ids / answer_mask (A, La)
    are the tokenised answer list ([CLS] pieces [SEP])."""
    comm = comm or LocalComm()
    n = len(eval_set)
    bounds = shard_bounds(n, comm.world_size, align=batch_size)
    start, end = bounds[comm.rank]
    dtype = next(model.visual_encoder.parameters()).dtype
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    preds = []
    try:
        with tqdm(total=end - start, desc="vqa answers", unit="q", disable=not progress, leave=False) as bar:
            batches = eval_set.image_batches(
                start, end, batch_size=batch_size, device=device, num_workers=num_workers
            )
            for images, qidx in batches:
                text = tokenizer([eval_set.questions[i] for i in qidx.tolist()])
                best, _ = model.rank_answers(
                    images.to(device, dtype, non_blocking=True),
                    text["input_ids"].to(device),
                    text["attention_mask"].to(device),
                    answer_ids,
                    answer_mask,
                    k=k,
                    double_count=double_count,
                    chunk=chunk,
                )
                preds.append(best)
                bar.update(len(qidx))
    finally:
        model.train(was_training)
    local = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)
    if local.shape[0] != end - start:
        raise RuntimeError(f"rank {comm.rank} answered {local.shape[0]} of its {end - start} questions")
    everything = comm.gather_rows(local.long(), [e - s for s, e in bounds])
    log.info(
        "answered %d questions (%d on this rank) in %.1f s, top-%d of %d answers",
        n,
        end - start,
        time.perf_counter() - t0,
        min(k, answer_ids.shape[0]),
        answer_ids.shape[0],
    )
    return everything.cpu().tolist()
