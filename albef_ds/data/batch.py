"""The batch format: the project's stable interface between the data loaders and the trainer::

    {"image": FloatTensor [B, 3, S, S], "input_ids": LongTensor [B, L], "attention_mask": LongTensor [B, L],
     "index": LongTensor [B], "num_skipped": int}           (+ "idx": LongTensor [B] image ids, on request)

B can be smaller than the requested batch size: samples whose image is missing or undecodable are dropped
and counted in `num_skipped` (web-scale image-text sets always have some broken files). Both loader backends
(`datasets.ImageTextCollator` for the torch reference, `dali.DaliImageTextLoader`) emit it.
"""

from __future__ import annotations

import torch


def empty_batch(skipped: int, image: torch.Tensor | None = None, with_idx: bool = False) -> dict:
    """The batch format with no sample (every image of the batch was skipped)."""
    out = {
        "image": torch.zeros((0, 3, 0, 0)) if image is None else image,
        "input_ids": torch.zeros((0, 0), dtype=torch.long),
        "attention_mask": torch.zeros((0, 0), dtype=torch.long),
        "index": torch.zeros(0, dtype=torch.long),
        "num_skipped": skipped,
    }
    if with_idx:
        out["idx"] = torch.zeros(0, dtype=torch.long)
    return out
