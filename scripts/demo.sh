#!/usr/bin/env bash
# The main command: generate the synthetic image-text set (if absent), pre-train the debug ALBEF on it,
# report ITC retrieval R@1 on the held-out split before and after. Extra arguments are config overrides
# (e.g. `bash scripts/demo.sh train.max_steps=100`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
albef-ds data synth --config configs/debug.yaml
albef-ds pretrain --config configs/debug.yaml "$@"
