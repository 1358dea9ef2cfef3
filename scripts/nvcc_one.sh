#!/usr/bin/env bash
# Compile one .cu file of accel with setup.py's flags (from build_config.py; sm_90 unless
# ACCEL_CUDA_ARCHS says otherwise), to check it builds without rebuilding the whole extension:
#   bash scripts/nvcc_one.sh csrc/op/cuda/file.cu [-Xptxas -v]      -> build/nvcc_one/file.o
# Uses $PYTHON, else .venv/bin/python, else python3: whichever is given must have torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
exec "$PY" build_config.py nvcc-one "$@"
