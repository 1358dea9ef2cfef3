"""Build script for accel's native extension ``accel._C``.

Environment:
  ACCEL_CUDA=auto|0|1   build CUDA kernels (auto: when nvcc and a CUDA build of torch are present)
  ACCEL_CUDA_ARCHS      semicolon list of compute capabilities, default "80;90" ("native": this GPU)
  MAX_JOBS              parallel compile jobs (torch's cpp_extension reads it)
  ACCEL_DEBUG=1         -O0 -g
"""
import glob
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"


def _say(msg):
    print(f"[accel setup] {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """CUDA_HOME from the environment, else the toolkit behind the nvcc on PATH.

    nvcc may be a wrapper script (``exec /usr/local/cuda-X/bin/nvcc "$@"``), so the script is
    read for the real path rather than trusting its location.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and Path(env, "bin", "nvcc").exists():
        return env
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent)
        try:
            text = real.read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for token in text.replace('"', " ").split():
            if token.endswith("/bin/nvcc"):
                candidates.insert(0, Path(token).parent.parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda*"), reverse=True)]
    for c in candidates:
        if (c / "bin" / "nvcc").is_file() and (c / "include" / "cuda_runtime.h").is_file():
            return str(c)
    return None


def pip_cuda_include_dirs():
    """Headers shipped in pip's nvidia-* wheels (cublas, cusparse, ...) that torch's CUDA headers include."""
    dirs = []
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots |= {str(Path(torch.__file__).resolve().parent.parent)}
    for root in roots:
        nv = Path(root) / "nvidia"
        if not nv.is_dir():
            continue
        for inc in [nv / "cu13" / "include", nv / "cu12" / "include"] + sorted(nv.glob("*/include")):
            if inc.is_dir() and str(inc) not in dirs:
                dirs.append(str(inc))
    return dirs


def cuda_header_dir():
    """A folder with the CUDA runtime headers for host-compiled code (the CUDA emulator tests):
    the toolkit's include, else pip's nvidia headers; None if neither is complete."""
    home = find_cuda_home()
    for inc in ([os.path.join(home, "include")] if home else []) + pip_cuda_include_dirs():
        if all(os.path.isfile(os.path.join(inc, h))
               for h in ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h", "crt/host_defines.h")):
            return inc
    return None


def resolve_cuda():
    mode = os.environ.get("ACCEL_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False, None, "ACCEL_CUDA=0"
    cuda_home = find_cuda_home()
    torch_cuda = torch.version.cuda
    ok = cuda_home is not None and torch_cuda is not None
    why = f"nvcc toolkit={cuda_home}, torch.version.cuda={torch_cuda}"
    if mode in ("1", "on", "true", "yes") and not ok:
        raise SystemExit(f"ACCEL_CUDA=1 but a CUDA build is not possible ({why})")
    return ok, cuda_home, why


def cuda_arch_flags(archs):
    if archs.strip() == "native":
        if not torch.cuda.is_available():
            raise SystemExit("ACCEL_CUDA_ARCHS=native needs a visible GPU")
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}{minor}"
    flags, names = [], []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "")
        if not a:
            continue
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        names.append(f"sm_{a}")
    return flags, names


def main():
    use_cuda, cuda_home, why = resolve_cuda()
    debug = os.environ.get("ACCEL_DEBUG", "0") == "1"
    archs = os.environ.get("ACCEL_CUDA_ARCHS", "80;90")

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    sources = sorted(set(sources))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))

    torch_ver = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # Release builds must run on any x86-64 with AVX2: no -march=native. ATen's Vectorized<T>
    # types follow the compile flags; oneDNN's brgemm (used for tile GEMMs) dispatches at run time.
    cxx_flags += ["-std=c++20", "-fvisibility=hidden", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # The x86-64 baseline of accel's wheels is AVX2+FMA (x86-64-v3): ATen's Vectorized<T>
        # then compiles to 256-bit AVX2 code in accel's kernels.
        cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    # ATen's at::parallel_for is an inline OpenMP region: without -fopenmp it runs on one thread.
    # The OpenMP runtime is the libgomp.so.1 torch already loaded (same soname).
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"]
        link_flags += ["-fopenmp"]
    include_dirs = [str(ROOT / "csrc")]
    extra = {"cxx": cxx_flags}
    built_archs = []

    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch reads it at import time
        arch_flags, built_archs = cuda_arch_flags(archs)
        pip_inc = pip_cuda_include_dirs()
        include_dirs += pip_inc
        sources += cuda_sources
        define_macros.append(("ACCEL_WITH_CUDA", "1"))
        extra["nvcc"] = (["-O0", "-G"] if debug else ["-O3", "-lineinfo"]) + [
            "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ] + (["-Xcompiler", "-fopenmp"] if link_flags else []) + arch_flags
        # torch's BuildExtension would add its own -gencode list from TORCH_CUDA_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(a.replace("sm_", "")[:-1] + "." + a[-1] for a in built_archs)
        local = f"cu{torch.version.cuda.replace('.', '')}torch{torch_ver}"
        ext_cls = cpp_extension.CUDAExtension
    else:
        local = "cpu"
        ext_cls = cpp_extension.CppExtension

    define_macros.append(("ACCEL_CUDA_ARCHS", '"' + ";".join(built_archs) + '"'))
    define_macros.append(("ACCEL_VERSION", f'"{BASE_VERSION}+{local}"'))
    version = f"{BASE_VERSION}+{local}"

    _say(f"version {version}")
    _say(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    _say(f"CUDA build: {'yes' if use_cuda else 'no'} ({why})")
    if use_cuda:
        _say(f"CUDA_HOME={cuda_home}; archs {' '.join(built_archs)}; extra includes {pip_cuda_include_dirs()}")
    _say(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}; {len(sources)} source files")

    ext = ext_cls(
        name="accel._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_flags,
    )
    setup(
        version=version,
        packages=find_packages(include=["accel", "accel.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
