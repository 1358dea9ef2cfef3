#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with torch and the build/test tools, then
# accel built in place (CUDA kernels too when nvcc and a CUDA build of torch are present;
# ACCEL_CUDA=0 skips them, ACCEL_CUDA=1 insists on them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${ACCEL_TORCH_SPEC:-torch==2.14.1}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q pybind11 ninja einops numpy pytest cmake matplotlib expecttest
# Hugging Face transformers, for the first-party accel-transformers plugin and its tests
.venv/bin/python -m pip install -q "transformers>=5"
echo "[setup] building accel (MAX_JOBS=${MAX_JOBS:-2}, ACCEL_CUDA=${ACCEL_CUDA:-auto})"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -e . --no-build-isolation --no-deps -v 2>&1 \
  | grep --line-buffered -E "^\[accel setup\]|error|Error|warning: |Successfully" || true
.venv/bin/python -c "import accel._C" || { echo "[setup] build failed"; exit 1; }
echo "[setup] build took $(( $(date +%s) - start )) s"
# First-party plugins are separate distributions, discovered through the accel.plugins entry point.
.venv/bin/python -m pip install -q -e ./plugins/transformers --no-deps --no-build-isolation
.venv/bin/python scripts/cuda_archs.py
.venv/bin/python -m accel.info
