#!/usr/bin/env bash
# GPU check of issue 14 (item 8): drpo fit with configs/drpo_fsdp.yaml on one GPU (bf16, a Qwen2.5-0.5B-shaped
# model with random weights), the same with asynchronous rollouts (worker, k = 1, same GPU), tokens/s and MFU
# of each, and the peak CUDA memory of the three quantized configs. Under 8 minutes; installs nothing from the
# internet (what is missing is reported; see scripts/gpu_check.py for the details and options).
#
#   bash scripts/gpu_check.sh                          # on the GPU machine, from the repo root
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh      # the same steps on the CPU with a tiny model
#
# With $OUT set, the log, the markdown block (gpu_check.md), the JSON results and the runs' logs go there too.
# PYTHON picks the interpreter (default: python3, else python).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ]; then echo "gpu_check: no python3 or python on PATH (set PYTHON)"; exit 2; fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT:$ROOT/scripts:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  "$PY" scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
exec "$PY" scripts/gpu_check.py "$@"
