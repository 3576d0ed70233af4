#!/usr/bin/env bash
# The project's GPU check, one script, under 8 minutes on one H100/H200; everything it measures lands as JSON
# in one folder (default benchmarks/results/gpu_check_<gpu>/), with summary.json listing every stage:
#   1. pytest -m gpu                       the compiled Triton kernels, the sync-debug step test (pytest_gpu.json)
#   2. benchmarks/bench_kernels.py         ITC fused vs reference, time and memory, B in {32,64,128,256},
#                                          Q 65,536; EMA GB/s over ALBEF-base's momentum tensors (kernels.json)
#   3. albef-ds bench throughput           ALBEF-base (configs/pretrain_4m.yaml), batch 64, 256 px, bf16,
#                                          ZeRO-2, one GPU: ours, ours+compile, ours+patch_dropout (0.5) and
#                                          the reference recipe side by side (throughput.json + .png)
#   4. benchmarks/sync_debug.py            5 steps under torch.cuda.set_sync_debug_mode("warn") (sync_debug.json)
#   5. benchmarks/bench_task_step.py       one NLVR2 step of ALBEF-base (configs/nlvr2.yaml: 384 px, batch 16,
#                                          18-block paired fusion), bf16 ZeRO-2: samples/s, peak memory
#                                          (nlvr2_step.json)
# A stage that fails does not stop the others (GPU minutes are scarce); the script exits 1 if any failed.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [extra `bench throughput` arguments...]
#
# --dry-run runs the same five stages at tiny sizes on whatever device there is (the debug config, batch 8,
# 1 warm-up + 1 timed step, Q 256), in a minute or two on a CPU: tests/bench/test_gpu_check.py runs it in CI,
# so a typo never costs GPU time.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
OUT=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
PY="${PYTHON:-python}"
gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else "cpu")')"
OUT="${OUT:-benchmarks/results/gpu_check_${gpu}$([[ $DRY == 1 ]] && echo _dry_run)}"
mkdir -p "$OUT"
# The one-process DeepSpeed stages form a process group: on a free port unless the caller chose one.
if [[ -z "${MASTER_PORT:-}" ]]; then
  MASTER_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  export MASTER_PORT
fi
if [[ $DRY == 1 ]]; then
  CONFIG=configs/debug.yaml
  MODEL=(train.batch_size=8 model.queue_size=64)
  STEPS=(--warmup 1 --steps 1)
  SYNC_STEPS=(--warmup 1 --steps 2)
  KERNEL_ARGS=(--dry-run)
  PYTEST_FILTER=(tests/kernels tests/train/test_step_syncs.py)  # collects and skips without CUDA
  PEAK=(--peak-tflops 1)
  NLVR=(--config configs/nlvr2_debug.yaml --warmup 1 --steps 2 train.batch_size=4 train.engine=deepspeed)
else
  CONFIG=configs/pretrain_4m.yaml
  MODEL=(train.batch_size=64 train.precision=bf16 train.ds_config=ds_configs/zero2_bf16.json)
  STEPS=(--warmup 3 --steps 10)
  SYNC_STEPS=(--warmup 2 --steps 5)
  KERNEL_ARGS=()
  PYTEST_FILTER=(tests)
  PEAK=()
  NLVR=(--config configs/nlvr2.yaml --warmup 3 --steps 10 train.batch_size=16 train.engine=deepspeed
        train.precision=bf16 train.ds_config=ds_configs/zero2_bf16.json)
fi

declare -A RC SECONDS_TAKEN
stage() {  # stage NAME COMMAND...: runs it, logs to $OUT/NAME.log, records its status and duration
  local name="$1"; shift
  local t0=$SECONDS
  echo "[gpu_check] $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECONDS_TAKEN[$name]=$((SECONDS - t0))
  echo "[gpu_check] $name: exit ${RC[$name]} after ${SECONDS_TAKEN[$name]} s (log $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log"
}

stage pytest_gpu "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$OUT/pytest_gpu.xml" "${PYTEST_FILTER[@]}"
# pytest exits 5 when every selected test was skipped or deselected (a CPU): not a failure of the check.
if [[ ${RC[pytest_gpu]} == 5 && $gpu == cpu ]]; then RC[pytest_gpu]=0; fi
stage kernels "$PY" benchmarks/bench_kernels.py --out "$OUT/kernels.json" "${KERNEL_ARGS[@]}"
stage throughput "$PY" -m albef_ds.cli bench throughput --config "$CONFIG" "${MODEL[@]}" \
  --engine deepspeed --recipe all "${STEPS[@]}" "${PEAK[@]}" --out "$OUT/throughput.json" "${EXTRA[@]}"
stage sync_debug "$PY" benchmarks/sync_debug.py --config "$CONFIG" --engine deepspeed "${SYNC_STEPS[@]}" \
  --out "$OUT/sync_debug.json" "${MODEL[@]}"
stage nlvr2_step "$PY" benchmarks/bench_task_step.py --task nlvr2 --out "$OUT/nlvr2_step.json" "${NLVR[@]}"

status=0
summary="{\"device\": \"$gpu\", \"dry_run\": $([[ $DRY == 1 ]] && echo true || echo false), \"stages\": {"
sep=""
for name in pytest_gpu kernels throughput sync_debug nlvr2_step; do
  summary+="$sep\"$name\": {\"exit\": ${RC[$name]}, \"seconds\": ${SECONDS_TAKEN[$name]}}"
  sep=", "
  [[ ${RC[$name]} == 0 ]] || status=1
done
summary+="}}"
"$PY" - "$OUT" "$summary" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, summary = Path(sys.argv[1]), json.loads(sys.argv[2])
junit = out / "pytest_gpu.xml"
if junit.is_file():  # the pytest stage as JSON: counts and the failures' names
    suites = ET.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    cases = suite.findall("testcase")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    (out / "pytest_gpu.json").write_text(json.dumps({
        "tests": len(cases), "failed": failed, "skipped": skipped,
        "passed": len(cases) - len(failed) - skipped, "seconds": float(suite.get("time", 0)),
    }, indent=1))
for name in ("kernels", "throughput", "sync_debug", "pytest_gpu", "nlvr2_step"):
    f = out / f"{name}.json"
    summary["stages"][name]["result"] = str(f) if f.is_file() else None
t = out / "throughput.json"
if t.is_file():  # the headline numbers, one line per recipe
    res = json.loads(t.read_text())
    summary["throughput"] = {
        r["recipe"]: {"samples_per_s_per_device": r["samples_per_s_per_device"], "mfu": r["mfu"],
                      "peak_mem_gb": r["peak_mem_gb"]} for r in res["recipes"]
    }
    summary["ratios"] = {k: v["median"] for k, v in res.get("ratios", {}).items()}
s = out / "sync_debug.json"
if s.is_file():
    summary["syncs_per_step"] = json.loads(s.read_text())["syncs_per_step"]
n = out / "nlvr2_step.json"
if n.is_file():
    r = json.loads(n.read_text())
    summary["nlvr2_step"] = {k: r[k] for k in ("samples_per_s", "step_time_s", "peak_mem_gb", "batch_per_device")}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PYEOF
echo "[gpu_check] wrote $OUT/summary.json; exit $status"
exit $status
