// The environment variables that force a code path, for tests and A/B timing against the
// default choice; read here and nowhere else. Unset or empty: the kernels choose by the CPU.
#pragma once

#include <cstdlib>
#include <string>

namespace accel::test_hooks {

inline std::string env_or_empty(const char* name) {
  const char* s = std::getenv(name);
  return s ? s : "";
}

// ACCEL_CPU_ISA: "avx2" hides AVX-512 (the baseline path runs), "avx512" hides its BF16
// extension.
inline std::string cpu_isa() { return env_or_empty("ACCEL_CPU_ISA"); }

// ACCEL_MOE_LOWP_GEMM: "tiles", "aten" or "widen" forces how fused MoE multiplies bf16/fp16
// experts with many tokens (see lowp_gemm in the fused MoE forward).
inline std::string moe_lowp_gemm() { return env_or_empty("ACCEL_MOE_LOWP_GEMM"); }

}  // namespace accel::test_hooks
