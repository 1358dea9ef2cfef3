// Small AVX-512 math helpers shared by the CPU kernels' epilogues (compiled for that target only,
// called behind cpu::cpu_has_avx512()).
#pragma once

#include "common/cpu_isa.h"

#ifdef ACCEL_HAVE_AVX512_TARGET
#include <immintrin.h>

namespace accel::cpu {

// 2^f for f in [0, 1): minimax polynomial, relative error about 1e-7
constexpr float kExp2Unit[6] = {0.9999999403953552f, 0.6931530833244324f, 0.24015361070632935f,
                                0.05582631751894951f, 0.008989340625703335f, 0.0018775766948238015f};

// GCC 12 flags the _mm512_undefined_*() pass-through of its own unmasked AVX-512 intrinsics as
// uninitialised once they are inlined here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 2^t for finite t: f = t - floor(t) in one instruction, and vscalefps multiplies by 2^floor(t)
// itself (0 below the denormal range, inf above the fp32 range; no clamp needed for finite t)
ACCEL_AVX512_TARGET inline __m512 exp2_avx512(__m512 t) {
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 q = _mm512_set1_ps(kExp2Unit[5]);
  for (int i = 4; i >= 0; --i) q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kExp2Unit[i]));
  return _mm512_scalef_ps(q, t);
}

#pragma GCC diagnostic pop

}  // namespace accel::cpu

#endif
