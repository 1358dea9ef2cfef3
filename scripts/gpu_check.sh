#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (the device tool's H200, or any CUDA box):
# builds accel for the local GPU, runs the CUDA tests and the GPU benchmarks, and writes the
# results under $OUT (default ./gpu-check-out). Meant to finish in under 10 minutes.
#
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Uses the python3 that has torch (no venv, no network needed): torch, pytest and ninja must be
# installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log="$OUT/gpu_check.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }

say "== gpu_check $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$log"

say "== build (ACCEL_CUDA=1, ACCEL_CUDA_ARCHS=native)"
start=$(date +%s)
ACCEL_CUDA=1 ACCEL_CUDA_ARCHS=${ACCEL_CUDA_ARCHS:-native} MAX_JOBS=${MAX_JOBS:-16} \
  $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
rc=$?
grep -E "^\[accel setup\]|error" "$OUT/build.log" | tee -a "$log"
say "build rc=$rc in $(( $(date +%s) - start )) s"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log" | tee -a "$log"; exit 1; }
PYTHONPATH=$PWD $PY -m accel.info 2>&1 | tee -a "$log"

say "== CUDA tests"
PYTHONPATH=$PWD timeout 360 $PY -m pytest -q -p no:cacheprovider tests/test_dilated_conv1d_cuda.py \
  tests/test_sigmoid_attention_cuda.py --junitxml="$OUT/cuda_tests.xml" 2>&1 | tail -40 | tee -a "$log"
test_rc=${PIPESTATUS[0]}
say "cuda tests rc=$test_rc"

say "== GPU benchmarks"
# sigmoid attention vs SDPA's flash backend: bf16, L 1k-16k, D 64 and 128, causal and not
PYTHONPATH=$PWD timeout 300 $PY -m accel.bench attention --device cuda --dtype bfloat16 --json "$OUT/bench_attention_cuda_bf16.json" 2>&1 | tee -a "$log"
PYTHONPATH=$PWD timeout 240 $PY -m accel.bench conv --device cuda --dtype bfloat16 --json "$OUT/bench_conv_cuda_bf16.json" 2>&1 | tee -a "$log"
PYTHONPATH=$PWD timeout 120 $PY -m accel.bench conv --device cuda --dtype float32 --quick --json "$OUT/bench_conv_cuda_fp32.json" 2>&1 | tee -a "$log"
say "== done $(date -u +%FT%TZ)"
exit $test_rc
