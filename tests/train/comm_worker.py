"""One rank of tests/train/test_comm.py (torchrun, gloo): the padded all-gather with unequal row counts.

Rank r holds ROWS[r] rows (rank r's rows have values 100 r + row); each rank writes what it saw to
<out>/rank<r>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from albef_ds.model import ALBEFPretrain
from albef_ds.train.comm import gather_rows, make_queue_gather
from tests.helpers import SPECIAL, tiny_model_config

ROWS = (5, 3)
MAX_ROWS = 8  # the per-rank capacity (batch x accumulation)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    n = ROWS[rank]
    torch.manual_seed(0)  # the same model and queues on both ranks
    model = ALBEFPretrain(
        tiny_model_config(queue_size=20), special_tokens=SPECIAL, all_gather=make_queue_gather(MAX_ROWS)
    )
    d = model.image_queue.shape[1]
    before_img, before_txt = model.image_queue.clone(), model.text_queue.clone()
    img = (100.0 * rank + torch.arange(n, dtype=torch.float32))[:, None].expand(n, d).contiguous()
    model.enqueue(img, -img)  # one padded all-gather of (n, 2D) rows
    model.enqueue(img[:1] + 0.5, -img[:1] - 0.5)  # then one row per rank: the pointer moves on by 2
    rows = gather_rows(img[:, :2].contiguous(), list(ROWS))  # evaluation's gather with known counts
    torch.save(
        {
            "image_queue": model.image_queue,
            "text_queue": model.text_queue,
            "queue_ptr": model.queue_ptr,
            "before_image": before_img,
            "before_text": before_txt,
            "rows": rows,
        },
        out / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
