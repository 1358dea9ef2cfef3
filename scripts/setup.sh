#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with torch and the build/test tools, then
# accel built in place (CUDA kernels too when nvcc and a CUDA build of torch are present;
# ACCEL_CUDA=0 skips them, ACCEL_CUDA=1 insists on them). A .venv that already has torch keeps
# its torch, so another version is set up by installing it there first.
# The build prints one line per compiled file; the compiler's full output is in build/setup.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY=.venv/bin/python

if [ ! -x $PY ]; then
  "$PYTHON" -m venv .venv
fi
$PY -m pip install -q --upgrade pip setuptools wheel
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.14.1
fi
$PY -m pip install -q pybind11 ninja einops numpy pytest cmake matplotlib expecttest
# Hugging Face transformers, for the first-party accel-transformers plugin and its tests
$PY -m pip install -q "transformers>=5"
# timm, for the first-party accel-timm plugin and its tests; it needs torchvision, which must match
# the torch already here (named in the same install, so the resolver cannot move torch)
$PY -m pip install -q "timm>=1.0" "torch==$($PY -c 'import importlib.metadata as m; print(m.version("torch"))')"

mkdir -p build
log=build/setup.log
echo "[setup] building accel (MAX_JOBS=${MAX_JOBS:-2}, ACCEL_CUDA=${ACCEL_CUDA:-auto}); full log: $log"
start=$SECONDS

# ninja reports "[n/N] <command> ... -c <source> ..." as each compile finishes (its output is not
# a terminal); show those as one short line each, with the build's elapsed time. pip indents the
# build's output and runs setup.py twice (metadata, then build): its report is shown once.
progress() {
  local line src seen=""
  while IFS= read -r line; do
    line=${line#"${line%%[![:space:]]*}"}
    case $line in
      "[accel setup]"*)
        [[ $seen == *"|$line|"* ]] || { echo "$line"; seen+="|$line|"; } ;;
      \[[0-9]*/[0-9]*\]\ *" -c "*)
        src=${line##* -c }; src=${src%% *}; src=${src#"$PWD/"}
        printf '[setup] %s %s  (%d s)\n' "${line%%]*}]" "$src" $((SECONDS - start)) ;;
      *" -shared "*) printf '[setup] linking accel/_C  (%d s)\n' $((SECONDS - start)) ;;
    esac
  done
}

set +e
MAX_JOBS=${MAX_JOBS:-2} $PY -m pip install -e . --no-build-isolation --no-deps -v 2>&1 | tee "$log" | progress
rc=${PIPESTATUS[0]}
set -e
warnings=$(grep -cE '(:[0-9]+:[0-9]+|\([0-9]+\)): warning' "$log" || true)
if [ "$rc" -ne 0 ] || ! $PY -c "import accel._C" 2>/dev/null; then
  echo "[setup] build failed after $((SECONDS - start)) s; full log: $log"
  if grep -q '^ *FAILED: ' "$log"; then
    # each failed compile: the command and everything the compiler said
    awk '/^ *FAILED: /{p=1} /^ *\[[0-9]+\/[0-9]+\] |^ *ninja: build stopped/{p=0} p' "$log"
  else
    tail -n 40 "$log"
  fi
  exit 1
fi
echo "[setup] build took $((SECONDS - start)) s; $warnings compiler warnings (see $log)"
# First-party plugins are separate distributions, discovered through the accel.plugins entry point.
$PY -m pip install -q -e ./plugins/transformers --no-deps --no-build-isolation >>"$log" 2>&1 \
  || { echo "[setup] installing plugins/transformers failed; full log: $log"; tail -n 40 "$log"; exit 1; }
$PY -m pip install -q -e ./plugins/timm --no-deps --no-build-isolation >>"$log" 2>&1 \
  || { echo "[setup] installing plugins/timm failed; full log: $log"; tail -n 40 "$log"; exit 1; }
$PY scripts/cuda_archs.py
$PY -m accel.info
