#!/usr/bin/env bash
# The main command: generate the synthetic image-text set (if absent), pre-train the debug ALBEF on it with
# DeepSpeed ZeRO-2 on 2 local ranks (every local GPU where there are any; 2 CPU ranks with gloo otherwise),
# report ITC retrieval R@1 on the held-out split before and after, then export the weights and evaluate the
# exported file. Extra arguments are config overrides (e.g. `bash scripts/demo.sh train.max_steps=100`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "$gpus" -gt 0 ]; then
  ranks="$gpus"
  extra=(train.ds_config=ds_configs/zero2_bf16.json)
else
  ranks=2
  extra=(train.ds_config=ds_configs/zero2_cpu.json data.num_workers=1)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one core per rank
fi
# The debug recipe's global batch is 32 pairs: split it over the ranks.
per_rank=$(( 32 / ranks > 0 ? 32 / ranks : 1 ))
port="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
albef-ds data synth --config configs/debug.yaml
albef-ds launch deepspeed --num_gpus "$ranks" --no_local_rank --master_port "$port" --module albef_ds.cli \
  pretrain --config configs/debug.yaml train.engine=deepspeed "train.batch_size=$per_rank" "${extra[@]}" "$@"
out_dir="$(python - "$@" <<'PY'
import sys
from albef_ds.config import load_config
print(load_config("configs/debug.yaml", sys.argv[1:]).train.output_dir)
PY
)"
albef-ds export "$out_dir" --output "$out_dir/albef.safetensors"
echo "[demo] retrieval of the exported weights on the held-out split:"
albef-ds evaluate pretrain --config configs/debug.yaml "$@" --checkpoint "$out_dir/albef.safetensors"
echo "[demo] retrieval with ITM re-ranking (ITC top-k + ITM) on the held-out split, on $ranks ranks:"
albef-ds launch deepspeed --num_gpus "$ranks" --no_local_rank --master_port "$port" --module albef_ds.cli \
  evaluate retrieval --config configs/debug.yaml "$@" eval.k_test=32 \
  --checkpoint "$out_dir/albef.safetensors" --output "$out_dir/retrieval_itm.json"
