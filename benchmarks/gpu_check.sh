#!/usr/bin/env bash
# The GPU check of the throughput issue, one script, a few minutes on one GPU: ALBEF-base (configs/pretrain_4m.yaml:
# ViT-B/16 at 256 px, BERT-base, queue 65,536), batch 64 per device, bf16, DeepSpeed ZeRO-2, random init and
# synthetic batches; ours and the reference recipe in the same run. Prints samples/s, MFU, peak memory and the
# ratio; writes benchmarks/results/throughput_albef_base_<gpu>.json + .png.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
gpu="$(python -c 'import torch; print(torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else "cpu")')"
python -m albef_ds.cli bench throughput --config configs/pretrain_4m.yaml \
  train.batch_size=64 train.precision=bf16 train.ds_config=ds_configs/zero2_bf16.json \
  --engine deepspeed --recipe both --warmup 3 --steps 10 \
  --out "benchmarks/results/throughput_albef_base_${gpu}.json" "$@"
