// Run-time CPU feature checks for kernels that carry an AVX-512 variant next to the baseline
// (AVX2) build: such functions are compiled with ACCEL_AVX512_TARGET and called only when
// cpu_has_avx512() says so. ACCEL_CPU_ISA=avx2 forces the baseline path (for tests and timing).
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ACCEL_HAVE_AVX512_TARGET 1
#define ACCEL_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
#endif

namespace accel::cpu {

inline bool cpu_has_avx512() {
#ifdef ACCEL_HAVE_AVX512_TARGET
  static const bool yes = [] {
    const char* isa = std::getenv("ACCEL_CPU_ISA");
    if (isa && std::string(isa) == "avx2") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace accel::cpu
