"""accel's build settings, shared by setup.py, CMakeLists.txt and scripts/nvcc_one.sh.

The compile flags, the CUDA architectures, the version and the CUDA toolkit search live here
only, so the Python extension, the CMake library and one-file nvcc checks cannot drift apart.

  python build_config.py cmake [--debug] [--cuda-archs 80,90]   CMake code (CMakeLists.txt includes it)
  python build_config.py nvcc-one FILE.cu [NVCC ARGS...]         compile one CUDA file as setup.py would
"""
import argparse
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
import torch.utils

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90"


def version():
    """accel's version, defined once as ``__version__`` in accel/__init__.py (read, not imported:
    importing accel needs the extension this build makes)."""
    text = (ROOT / "accel" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    if not m:
        raise SystemExit("accel/__init__.py has no __version__ line")
    return m.group(1)


def local_version(use_cuda):
    """The wheel's local tag: +cu130torch2.14 for a CUDA build, +cpu without CUDA."""
    if not use_cuda:
        return "cpu"
    torch_ver = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return f"cu{torch.version.cuda.replace('.', '')}torch{torch_ver}"


def debug_build():
    return os.environ.get("ACCEL_DEBUG", "0") == "1"


def _openmp():
    # ATen's at::parallel_for is an inline OpenMP region: without -fopenmp it runs on one thread.
    # The OpenMP runtime is the libgomp.so.1 torch already loaded (same soname).
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cxx_flags(debug=False):
    flags = ["-O0", "-g"] if debug else ["-O3"]
    flags += ["-std=c++20", "-fvisibility=hidden", "-Wall", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # The x86-64 baseline is AVX2+FMA (x86-64-v3), never -march=native, so a build runs on any
        # AVX2 machine: ATen's Vectorized<T> compiles to 256-bit code; wider ISAs dispatch at run time.
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return flags + _openmp()


def link_flags():
    return _openmp()


def nvcc_flags(debug=False):
    """nvcc flags without the architectures (see gencode_flags)."""
    flags = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
    flags += ["-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr"]
    # torch's extension build defines all four __CUDA_NO_HALF*__ macros; the kernels use the scalar
    # half/bf16 operators and conversions, so those come back, and the half2 operators stay off in
    # the CMake build as well.
    flags += ["-D__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    # one token per flag: CMake de-duplicates repeated options such as a bare -Xcompiler
    return flags + [f"-Xcompiler={f}" for f in _openmp()]


def cuda_archs(spec=None):
    """Compute capabilities as ["80", "90"] from a ;- or ,-separated spec (default
    ACCEL_CUDA_ARCHS, else 80;90); "native" is the visible GPU's."""
    spec = (spec or os.environ.get("ACCEL_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS).strip()
    if spec == "native":
        if not torch.cuda.is_available():
            raise SystemExit("ACCEL_CUDA_ARCHS=native needs a visible GPU")
        major, minor = torch.cuda.get_device_capability()
        spec = f"{major}{minor}"
    archs = [a.strip().replace(".", "") for a in spec.replace(",", ";").split(";")]
    return [a for a in archs if a]


def gencode_flags(archs):
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


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


def include_dirs(use_cuda):
    """accel's include path; a CUDA build adds pip's nvidia headers, which torch's CUDA headers
    include and a bare toolkit may lack."""
    return [str(ROOT / "csrc")] + (pip_cuda_include_dirs() if use_cuda else [])


def cuda_header_dir():
    """A folder with the CUDA runtime headers for host-compiled code (the CUDA emulator tests):
    the toolkit's include, else pip's nvidia headers; None if neither is complete."""
    home = find_cuda_home()
    for inc in ([os.path.join(home, "include")] if home else []) + pip_cuda_include_dirs():
        if all(os.path.isfile(os.path.join(inc, h))
               for h in ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h", "crt/host_defines.h")):
            return inc
    return None


def _cmake_str(value):
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def cmake_config(debug, archs):
    """CMake code: where torch and the CUDA toolkit are (values given with -D win) and the flags."""
    out = ["# Generated by build_config.py at configure time; edit build_config.py instead."]
    out.append(f"list(APPEND CMAKE_PREFIX_PATH {_cmake_str(torch.utils.cmake_prefix_path)})")
    hints = {}
    if torch.version.cuda:
        # A CUDA build of torch makes find_package(Torch) look for the toolkit and for nvrtc, which
        # pip ships in the nvidia-* wheels rather than in the toolkit.
        home = find_cuda_home()
        if home:
            hints.update(CUDA_TOOLKIT_ROOT_DIR=home, CUDAToolkit_ROOT=home, CMAKE_CUDA_COMPILER=f"{home}/bin/nvcc")
        for inc in pip_cuda_include_dirs():
            libs = sorted(glob.glob(os.path.join(os.path.dirname(inc), "lib", "libnvrtc.so*")))
            libs = [p for p in libs if "builtins" not in p and ".alt." not in p]
            if libs:
                hints["CUDA_nvrtc_LIBRARY"] = libs[0]
                break
        # torch's CMake config turns this list into -gencode flags of its own; the same list keeps
        # it from probing for a GPU (CMakeLists.txt then keeps only ACCEL_NVCC_FLAGS' gencodes).
        hints["TORCH_CUDA_ARCH_LIST"] = ";".join(re.sub(r"^(\d+)(\d)", r"\1.\2", a) for a in archs)
    # headers for the CUDA emulator tests (host-compiled kernels, no GPU, no cudart)
    emu_headers = cuda_header_dir()
    if emu_headers:
        hints["ACCEL_CUDA_HEADERS"] = emu_headers
    for name, value in hints.items():
        out.append(f"if(NOT DEFINED {name})\n  set({name} {_cmake_str(value)})\nendif()")
    lists = {
        "ACCEL_VERSION": [version()],
        "ACCEL_CXX_FLAGS": cxx_flags(debug),
        "ACCEL_LINK_FLAGS": link_flags(),
        "ACCEL_NVCC_FLAGS": nvcc_flags(debug) + gencode_flags(archs),
        "ACCEL_CUDA_INCLUDE_DIRS": include_dirs(True)[1:],
        "ACCEL_CUDA_ARCH_NAMES": [f"sm_{a}" for a in archs],
    }
    for name, values in lists.items():
        out.append(f"set({name} {' '.join(_cmake_str(v) for v in values)})")
    return "\n".join(out) + "\n"


def nvcc_one_command(src, extra, debug, archs):
    """The nvcc command that compiles one .cu file of accel._C the way setup.py's build does:
    torch's own extension defines and flags, then accel's."""
    home = find_cuda_home()
    if home is None:
        raise SystemExit("no CUDA toolkit found (set CUDA_HOME)")
    os.environ["CUDA_HOME"] = home  # read when cpp_extension is imported
    from torch.utils import cpp_extension
    out = ROOT / "build" / "nvcc_one" / (Path(src).stem + ".o")
    out.parent.mkdir(parents=True, exist_ok=True)
    includes = include_dirs(True) + cpp_extension.include_paths("cuda") + [f"{home}/include"]
    includes += [sysconfig.get_paths()["include"]]
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DACCEL_WITH_CUDA=1",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return ([f"{home}/bin/nvcc", "-c", str(src), "-o", str(out)] + defines + [f"-I{i}" for i in includes]
            + cpp_extension.COMMON_NVCC_FLAGS + ["-Xcompiler", "-fPIC"] + nvcc_flags(debug)
            + gencode_flags(archs) + list(extra)), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cm = sub.add_parser("cmake", help="print the CMake configuration")
    cm.add_argument("--debug", action="store_true", help="-O0 -g (-G for CUDA)")
    cm.add_argument("--cuda-archs", help="compute capabilities, e.g. 80,90 (default: ACCEL_CUDA_ARCHS or 80;90)")
    one = sub.add_parser("nvcc-one",
                         help="compile one .cu file into build/nvcc_one/ (sm_90 unless ACCEL_CUDA_ARCHS)")
    one.add_argument("src")
    one.add_argument("extra", nargs=argparse.REMAINDER, help="more nvcc arguments, e.g. -Xptxas -v")
    args = parser.parse_args(argv)
    if args.cmd == "cmake":
        sys.stdout.write(cmake_config(args.debug, cuda_archs(args.cuda_archs)))
        return 0
    archs = cuda_archs(os.environ.get("ACCEL_CUDA_ARCHS") or "90")
    cmd, out = nvcc_one_command(args.src, args.extra, debug_build(), archs)
    rc = subprocess.call(cmd)
    if rc == 0:
        print(f"ok: {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
