// The Python module accel._C: loading it registers every op (each kernel file registers itself
// through TORCH_LIBRARY_IMPL); it also reports how the extension was built.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "common/cpu_isa.h"
#include "common/cpu_memory.h"
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#ifndef ACCEL_VERSION
#define ACCEL_VERSION "unknown"
#endif
#ifndef ACCEL_CUDA_ARCHS
#define ACCEL_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = ACCEL_VERSION;
#ifdef ACCEL_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = ACCEL_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
  d["torch_compiled"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                        std::to_string(TORCH_VERSION_PATCH);
#if defined(CPU_CAPABILITY_AVX512)
  d["cpu_isa"] = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  d["cpu_isa"] = "avx2";
#else
  d["cpu_isa"] = "baseline";
#endif
  // what this CPU offers the kernels' run-time dispatch (the ACCEL_CPU_ISA override applied)
  pybind11::list runtime;
  if (accel::cpu::cpu_has_avx512()) runtime.append("avx512");
  if (accel::cpu::cpu_has_avx512_bf16()) runtime.append("avx512_bf16");
  if (accel::cpu::cpu_has_avx512_fp16()) runtime.append("avx512_fp16");
  if (accel::cpu::cpu_has_amx_bf16()) runtime.append("amx_bf16");
  d["cpu_runtime_isa"] = runtime;
  d["parallel"] = at::get_parallel_info();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "accel native kernels";
  m.def("build_info", &build_info, "How this extension was built");
  m.def(
      "cpu_cache_stats",
      [] {
        const auto s = accel::cpu_cache_stats();
        pybind11::dict d;
        d["cached_bytes"] = s.cached_bytes;
        d["in_use_bytes"] = s.in_use_bytes;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        return d;
      },
      "Large CPU output buffers: bytes cached for reuse and in use, cache hits and misses");
  m.def("cpu_cache_release", &accel::cpu_cache_release, "Free every cached CPU output buffer");
}
