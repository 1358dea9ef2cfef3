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

from setup import cuda_header_dir, find_cuda_home, pip_cuda_include_dirs  # noqa: E402

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

# Headers for the CUDA emulator tests (host-compiled kernels, no GPU, no cudart)
emu_headers = cuda_header_dir()
if emu_headers:
    print(f"ACCEL_CUDA_HEADERS={emu_headers}")
