#!/usr/bin/env bash
# Compile one .cu file of accel with the flags setup.py uses (sm_90 only), to check it builds
# without rebuilding the whole extension:  bash scripts/nvcc_one.sh csrc/op/cuda/file.cu [-Xptxas -v]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/venv/bin/python}
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TI=$SITE/torch/include
CUDA_HOME=${CUDA_HOME:-$(ls -d /usr/local/cuda-1* 2>/dev/null | sort -V | tail -1)}
src=$1; shift
out=${NVCC_ONE_OUT:-/tmp/nvcc_one}/$(basename "$src" .cu).o
mkdir -p "$(dirname "$out")"
"$CUDA_HOME/bin/nvcc" -c "$src" -o "$out" -DTORCH_EXTENSION_NAME=_C -DACCEL_WITH_CUDA=1 \
  -I"$PWD/csrc" -I"$TI" -I"$TI/torch/csrc/api/include" -I"$CUDA_HOME/include" -I"$SITE/nvidia/cu13/include" \
  -I"$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC -O3 -lineinfo -std=c++20 \
  --use_fast_math -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -Xcompiler -fopenmp -gencode=arch=compute_90,code=sm_90 -DTORCH_API_INCLUDE_EXTENSION_H "$@"
echo "ok: $out"
