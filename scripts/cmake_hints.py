"""Print CMake cache settings that let find_package(Torch) work with a pip-installed torch.

A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit and for nvrtc, which
pip ships in the nvidia-* wheels rather than in the toolkit. Output: one VAR=VALUE per line.
"""
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.utils  # noqa: E402

from setup import find_cuda_home, pip_cuda_include_dirs  # noqa: E402

print(f"TORCH_CMAKE_PREFIX={torch.utils.cmake_prefix_path}")
if torch.version.cuda:
    home = find_cuda_home()
    if home:
        print(f"CUDA_TOOLKIT_ROOT_DIR={home}")
        print(f"CUDAToolkit_ROOT={home}")
        print(f"CMAKE_CUDA_COMPILER={home}/bin/nvcc")
    for inc in pip_cuda_include_dirs():
        libs = sorted(glob.glob(os.path.join(os.path.dirname(inc), "lib", "libnvrtc.so*")))
        libs = [p for p in libs if "builtins" not in p and ".alt." not in p]
        if libs:
            print(f"CUDA_nvrtc_LIBRARY={libs[0]}")
            break

# Headers for the CUDA emulator tests (host-compiled kernels, no GPU, no cudart): the toolkit's,
# else pip's nvidia runtime headers.
header_dirs = ([os.path.join(find_cuda_home(), "include")] if find_cuda_home() else []) + pip_cuda_include_dirs()
for inc in header_dirs:
    if all(os.path.isfile(os.path.join(inc, h)) for h in ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h", "crt/host_defines.h")):
        print(f"ACCEL_CUDA_HEADERS={inc}")
        break
