"""One rank of the DeepSpeed-pitfall check (test_deepspeed_pitfalls.py runs it: `deepspeed --num_gpus 2`).

For each precision (fp32, then bf16) it builds the tiny ALBEF with a *different* seed on every rank (so
parameters and buffers start out different, as they would without care), wraps it in our DeepSpeedEngine,
trains a few steps with the EMA and the enqueue, and writes what it found to <out>/<precision>_rank<N>.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from albef_ds.config import load_config  # noqa: E402
from albef_ds.model import ALBEFPretrain  # noqa: E402
from albef_ds.train.comm import make_queue_gather  # noqa: E402
from albef_ds.train.dist_env import world_info_from_env  # noqa: E402
from albef_ds.train.engine import DeepSpeedEngine, init_distributed  # noqa: E402
from tests.helpers import SPECIAL, tiny_model_config  # noqa: E402

MOMENTUM = 0.995
STEPS = 4
BATCH = 4


def sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(precision: str, info, out: Path) -> None:
    ds_json = "ds_configs/zero2_bf16.json" if precision == "bf16" else "ds_configs/zero2_cpu.json"
    cfg = load_config(
        None,
        [
            "train.engine=deepspeed",
            f"train.batch_size={BATCH}",
            f"train.ds_config={ROOT / ds_json}",
            f"train.precision={precision}",
            f"model.momentum={MOMENTUM}",
        ],
    )
    cfg.model = tiny_model_config(queue_size=16, momentum=MOMENTUM)
    torch.manual_seed(
        1000 + info.rank
    )  # every rank starts from different weights, momentum copies and queues
    model = ALBEFPretrain(cfg.model, special_tokens=SPECIAL, all_gather=make_queue_gather(BATCH))
    eng = DeepSpeedEngine(model, cfg, torch.device("cpu"), info)
    m = eng.module
    rep = {
        "rank": info.rank,
        "temp_shape": list(m.temp.shape),
        "zero_dim_params": [n for n, p in m.named_parameters() if p.dim() == 0],
        "gradient_clipping": eng.engine.gradient_clipping(),
        "param_dtypes": sorted({str(p.dtype) for p in m.parameters()}),
        "buffer_dtypes": sorted({str(b.dtype) for b in m.buffers() if b.is_floating_point()}),
        "params_sha_at_init": sha(m.parameters()),
        "buffers_sha_at_init": sha(m.buffers()),
    }
    moms, onlines = m.momentum_pairs()
    ref = [pm.detach().double().clone() for pm in moms]  # the EMA in float64, from the same online weights
    g = torch.Generator().manual_seed(7 + info.rank)
    losses = []
    for _ in range(STEPS):
        for r, p in zip(ref, onlines):
            r.mul_(MOMENTUM).add_(p.detach().double(), alpha=1 - MOMENTUM)
        m.momentum_update()
        image = torch.randn(BATCH, 3, 32, 32, generator=g)
        ids = torch.randint(5, 50, (BATCH, 10), generator=g)
        ids[:, 0] = SPECIAL["cls"]
        # the loaders deliver images in the engine's input dtype (bf16 here under bf16)
        res = eng.forward(
            image=image.to(eng.input_dtype), input_ids=ids, attention_mask=torch.ones_like(ids), alpha=0.4
        )
        eng.backward(res.loss)
        eng.step(last=True)
        m.enqueue(res.image_feat_m, res.text_feat_m)  # fp32 queue, features in the training dtype
        losses.append(float(res.loss.detach().float()))
    rep["losses"] = losses
    rep["momentum_dtypes"] = sorted({str(pm.dtype) for pm in moms})
    rep["queue_dtype"] = str(m.image_queue.dtype)
    rep["ema_max_abs_err"] = max((pm.double() - r).abs().max().item() for pm, r in zip(moms, ref))
    rep["buffers_sha_after"] = sha(m.buffers())
    rep["params_sha_after"] = sha(m.parameters())
    (out / f"{precision}_rank{info.rank}.json").write_text(json.dumps(rep))
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    info = world_info_from_env()
    init_distributed(info, torch.device("cpu"))
    for precision in ("fp32", "bf16"):
        run(precision, info, out)


if __name__ == "__main__":
    main()
