// Run-time CPU feature checks for kernels that carry an AVX-512 variant next to the baseline
// (AVX2) build: such functions are compiled with ACCEL_AVX512_TARGET and called only when
// cpu_has_avx512() says so. ACCEL_CPU_ISA=avx2 forces the baseline path (for tests and timing).
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ACCEL_HAVE_AVX512_TARGET 1
#define ACCEL_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
#define ACCEL_AVX512BF16_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16")))
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

// AVX-512 with the BF16 extension (vdpbf16ps); ACCEL_CPU_ISA=avx512 hides the extension.
inline bool cpu_has_avx512_bf16() {
#ifdef ACCEL_HAVE_AVX512_TARGET
  static const bool yes = [] {
    if (!cpu_has_avx512()) return false;
    const char* isa = std::getenv("ACCEL_CPU_ISA");
    if (isa && std::string(isa) == "avx512") return false;
    return static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
  }();
  return yes;
#else
  return false;
#endif
}

// AMX with bf16 tiles: oneDNN's bf16 GEMM runs on it, far beyond what vdpbf16ps tiles reach.
inline bool cpu_has_amx_bf16() {
#ifdef ACCEL_HAVE_AVX512_TARGET
  static const bool yes = [] {
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("amx-bf16"));
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace accel::cpu
