#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (the device tool's H200, or any CUDA box):
# builds accel for the local GPU, runs every CUDA test file (tests/test_*_cuda.py), a short
# compute-sanitizer memcheck pass over all kernels, and the GPU benchmarks; writes the results
# under $OUT (default ./gpu-check-out). Meant to finish in well under 10 minutes.
#
#   OUT=/some/dir bash scripts/gpu_check.sh            # everything
#   GPU_CHECK_SKIP=bench OUT=... bash scripts/gpu_check.sh   # skip a stage: build, tests, sanitize, bench
#
# Uses the python3 that has torch (no venv, no network needed): torch, pytest and ninja must be
# installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SKIP=${GPU_CHECK_SKIP:-}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
log="$OUT/gpu_check.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }
skip() { [[ ",$SKIP," == *",$1,"* ]]; }

say "== gpu_check $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$log"

if ! skip build; then
  # A compiler whose libstdc++ is partly linked statically into the extension (a devtoolset-style
  # /opt/gcc, say) gives an _C.so with its own copy of the iostream code: every error message that
  # formats an integer then crashes. GPU_CHECK_CXX=system builds with /usr/bin/g++ where it exists.
  if [ "${GPU_CHECK_CXX:-system}" = system ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++
  fi
  say "compiler: ${CXX:-c++} ($(${CXX:-c++} --version | head -1))"
  say "== build (ACCEL_CUDA=1, ACCEL_CUDA_ARCHS=${ACCEL_CUDA_ARCHS:-native})"
  start=$(date +%s)
  ACCEL_CUDA=1 ACCEL_CUDA_ARCHS=${ACCEL_CUDA_ARCHS:-native} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  grep -E "^\[accel setup\]|error" "$OUT/build.log" | head -60 | tee -a "$log"
  say "build rc=$rc in $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || { tail -60 "$OUT/build.log" | tee -a "$log"; exit 1; }
fi
$PY -m accel.info 2>&1 | tee -a "$log"
# an error message with numbers in it, formatted inside _C.so (see the compiler note above)
$PY -c "
import torch, accel.ops
try:
    torch.ops.accel.dilated_conv1d(torch.zeros(1, 4, 8), torch.zeros(4, 1, 3), None, None, 1, 2, 8, 3, 'none')
except RuntimeError as e:
    print('error messages ok:', str(e).splitlines()[0][:80])
" 2>&1 | tee -a "$log"
[ ${PIPESTATUS[0]} -eq 0 ] || say "WARNING: formatting an error message crashed: this toolchain's _C.so is broken"

test_rc=0
if ! skip tests; then
  # one pytest process per file: a crash in one file does not hide the others' results
  for f in ${CUDA_TESTS:-tests/test_*_cuda.py}; do
    name=$(basename "$f" .py)
    say "== $name"
    start=$(date +%s)
    timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q -p no:cacheprovider -o addopts="" --timeout=${TEST_CASE_TIMEOUT:-60} \
      -rfE ${PYTEST_ARGS:-} "$f" >"$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || test_rc=$rc
    grep -E "^(FAILED|ERROR)|passed|failed|Fatal Python error" "$OUT/$name.log" | head -60 | tee -a "$log"
    say "$name rc=$rc in $(( $(date +%s) - start )) s"
  done
fi

if ! skip bench; then
  say "== GPU benchmarks"
  # every op's benchmark group, from the capability records: accel vs SDPA's flash backend, cuDNN,
  # grouped_mm, ... in bf16
  groups=$($PY -c "from accel.ops import capabilities; print(' '.join(c.bench for c in capabilities().values() if c.bench))")
  [ -n "$groups" ] || { say "ERROR: no benchmark group found (accel.ops failed to import)"; test_rc=1; }
  for group in $groups; do
    timeout ${BENCH_TIMEOUT:-200} $PY -m accel.bench "$group" --device cuda --dtype bfloat16 --budget ${BENCH_BUDGET:-0.5} \
      --json "$OUT/bench_${group}_cuda_bf16.json" 2>&1 | tee -a "$log"
  done
fi
if ! skip sanitize && command -v compute-sanitizer >/dev/null; then
  say "== compute-sanitizer memcheck"
  timeout ${SANITIZE_TIMEOUT:-90} compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY scripts/gpu_sanitize.py >"$OUT/sanitize.log" 2>&1
  say "memcheck rc=$?"
  grep -E "ok$|Invalid|ERROR SUMMARY|Error" "$OUT/sanitize.log" | head -30 | tee -a "$log"
fi

say "== done $(date -u +%FT%TZ)"
exit $test_rc
