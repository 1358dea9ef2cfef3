// Run-time CPU feature checks for kernels that carry an AVX-512 variant next to the baseline
// (AVX2) build: such functions are compiled with ACCEL_AVX512_TARGET and called only when
// cpu_has_avx512() says so. ACCEL_CPU_ISA=avx2 forces the baseline path (for tests and timing;
// see common/test_hooks.h).
#pragma once

#include "common/test_hooks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define ACCEL_HAVE_AVX512_TARGET 1
#define ACCEL_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
#define ACCEL_AVX512BF16_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16")))
#endif

namespace accel::cpu {

inline bool cpu_has_avx512() {
#ifdef ACCEL_HAVE_AVX512_TARGET
  static const bool yes = [] {
    if (test_hooks::cpu_isa() == "avx2") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  }();
  return yes;
#else
  return false;
#endif
}

// CPUID leaf 7 (subleaf `sub`) register `reg` (0 EAX .. 3 EDX), bit `bit`: read directly, as older
// compilers' __builtin_cpu_supports lacks the newer names. Only for extensions of AVX-512 (whose
// register state cpu_has_avx512's check already covers) or with their own OS check.
inline bool cpuid7_bit(unsigned sub, int reg, int bit) {
#ifdef ACCEL_HAVE_AVX512_TARGET
  unsigned r[4] = {0, 0, 0, 0};
  if (__get_cpuid_count(7, sub, &r[0], &r[1], &r[2], &r[3]) == 0) return false;
  return ((r[reg] >> bit) & 1u) != 0;
#else
  (void)sub, (void)reg, (void)bit;
  return false;
#endif
}

// AVX-512 with the BF16 extension (vdpbf16ps; CPUID.7.1:EAX[5]); ACCEL_CPU_ISA=avx512 hides it.
inline bool cpu_has_avx512_bf16() {
  static const bool yes = [] {
    if (!cpu_has_avx512()) return false;
    if (test_hooks::cpu_isa() == "avx512") return false;
    return cpuid7_bit(1, 0, 5);
  }();
  return yes;
}

// AVX-512 with the FP16 extension (CPUID.7.0:EDX[23]).
inline bool cpu_has_avx512_fp16() {
  static const bool yes = cpu_has_avx512() && cpuid7_bit(0, 3, 23);
  return yes;
}

// AMX with bf16 tiles (CPUID.7.0:EDX[22]): oneDNN's bf16 GEMM runs on it, far beyond what
// vdpbf16ps tiles reach. (oneDNN asks the OS for the tile state; where that is refused it falls back
// to AVX512-BF16 and accel's choice of oneDNN merely forgoes its own tiles.)
inline bool cpu_has_amx_bf16() {
  static const bool yes = cpuid7_bit(0, 3, 22);
  return yes;
}

}  // namespace accel::cpu
