"""The one padded all-gather on 2 real ranks (torchrun, gloo) with unequal row counts: the queue writes
exactly the valid rows, in rank order, and evaluation's gather returns each row once."""

from __future__ import annotations

import os
import subprocess

import torch

from tests.helpers import ROOT, torchrun
from tests.train.comm_worker import ROWS


def test_padded_gather_with_unequal_rows_writes_exactly_the_valid_rows(tmp_path):
    cmd = torchrun(2, "-m", "tests.train.comm_worker", str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in ("image_queue", "text_queue", "queue_ptr", "rows"):
        assert torch.equal(r0[k], r1[k]), k  # both ranks hold the same queue
    q = r0["image_queue"]
    n = sum(ROWS)  # 8 valid rows of the 16 gathered (2 ranks x 8 slots, 3 + 5 of them padding)
    want = torch.cat([100.0 * r + torch.arange(ROWS[r], dtype=torch.float32) for r in range(2)])
    # first write: the valid rows at slots 0..7 in rank order; second: one row per rank at 8, 9
    assert torch.equal(q[:n, 0], want)
    assert torch.equal(q[n : n + 2, 0], torch.tensor([0.5, 100.5]))
    assert torch.equal(r0["text_queue"][: n + 2], -q[: n + 2])
    assert torch.equal(q[n + 2 :], r0["before_image"][n + 2 :])  # padding wrote nothing
    assert torch.equal(r0["text_queue"][n + 2 :], r0["before_text"][n + 2 :])
    assert int(r0["queue_ptr"]) == n + 2
    assert torch.equal(r0["rows"][:, 0], want) and r0["rows"].shape == (n, 2)
