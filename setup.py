"""Build script for accel's native extension ``accel._C``.

Environment:
  ACCEL_CUDA=auto|0|1   build CUDA kernels (auto: when nvcc and a CUDA build of torch are present)
  ACCEL_CUDA_ARCHS      semicolon list of compute capabilities, default "80;90" ("native": this GPU)
  ACCEL_DEBUG=1         -O0 -g (and -G for CUDA)
  MAX_JOBS              parallel compile jobs (torch's cpp_extension reads it)
  CUDA_HOME             the CUDA toolkit, else found from the nvcc on PATH

The compile flags, the version and the toolkit search live in build_config.py (CMake uses it too).
"""
import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
# setuptools' PEP 517 backend does not put the project folder on sys.path
sys.path.insert(0, str(ROOT))
import build_config  # noqa: E402


def _say(msg):
    print(f"[accel setup] {msg}", file=sys.stderr, flush=True)


def resolve_cuda():
    mode = os.environ.get("ACCEL_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False, None, "ACCEL_CUDA=0"
    cuda_home = build_config.find_cuda_home()
    torch_cuda = torch.version.cuda
    ok = cuda_home is not None and torch_cuda is not None
    why = f"nvcc toolkit={cuda_home}, torch.version.cuda={torch_cuda}"
    if mode in ("1", "on", "true", "yes") and not ok:
        raise SystemExit(f"ACCEL_CUDA=1 but a CUDA build is not possible ({why})")
    return ok, cuda_home, why


def main():
    use_cuda, cuda_home, why = resolve_cuda()
    debug = build_config.debug_build()

    sources = sorted(set(glob.glob("csrc/*.cpp") + glob.glob("csrc/**/*.cpp", recursive=True)))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))

    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    include_dirs = build_config.include_dirs(use_cuda)
    extra = {"cxx": build_config.cxx_flags(debug)}
    archs = []

    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch reads it at import time
        archs = build_config.cuda_archs()
        sources += cuda_sources
        define_macros.append(("ACCEL_WITH_CUDA", "1"))
        # with -gencode flags present, torch's BuildExtension adds no architectures of its own
        extra["nvcc"] = build_config.nvcc_flags(debug) + build_config.gencode_flags(archs)
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension

    version = f"{build_config.version()}+{build_config.local_version(use_cuda)}"
    arch_names = [f"sm_{a}" for a in archs]
    define_macros.append(("ACCEL_CUDA_ARCHS", '"' + ";".join(arch_names) + '"'))
    define_macros.append(("ACCEL_VERSION", f'"{version}"'))

    _say(f"version {version}")
    _say(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    _say(f"CUDA build: {'yes' if use_cuda else 'no'} ({why})")
    if use_cuda:
        _say(f"CUDA_HOME={cuda_home}; archs {' '.join(arch_names)}; extra includes {include_dirs[1:]}")
    _say(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}; {len(sources)} source files"
         + ("; debug build" if debug else ""))

    ext = ext_cls(
        name="accel._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=build_config.link_flags(),
    )
    setup(
        version=version,
        packages=find_packages(include=["accel", "accel.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
