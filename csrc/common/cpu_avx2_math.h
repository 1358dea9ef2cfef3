// Small AVX2 math helpers shared by the CPU kernels (AVX2 + FMA is the build's x86-64 baseline).
#pragma once

namespace accel::cpu {
constexpr float kLog2e = 1.4426950408889634f;
}  // namespace accel::cpu

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace accel::cpu {

// 2^f, degree 5, fitted for relative error on [-1/2, 1/2] (max 2.3e-7 in fp32).
constexpr float kExp2Half[6] = {1.0000001192092896f, 0.6931469440460205f, 0.24022120237350464f,
                                0.05550713092088699f, 0.009675541892647743f, 0.001327647129073739f};

// 2^t = q * e with t clamped to [-126, 126] (a NaN t gives 2^-126): t = n + f with |f| <= 1/2,
// q = 2^f by the polynomial, e = 2^n through the exponent bits. Cheaper than ATen's exp_u20 (no
// range masks) and more accurate.
inline void exp2_parts(__m256 t, __m256& q, __m256& e) {
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-126.f)), _mm256_set1_ps(126.f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  q = _mm256_set1_ps(kExp2Half[5]);
  for (int i = 4; i >= 0; --i) q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kExp2Half[i]));
  e = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

inline __m256 exp2_avx2(__m256 t) {
  __m256 q, e;
  exp2_parts(t, q, e);
  return _mm256_mul_ps(q, e);
}

// 1 / (1 + 2^t): sigmoid(x) with t = -x log2(e) (0 or 1 to fp32 precision past the clamp); the
// reciprocal is rcp + one Newton step (about 1e-7 relative).
inline __m256 sigmoid_of_t(__m256 t) {
  __m256 q, e;
  exp2_parts(t, q, e);
  const __m256 d = _mm256_fmadd_ps(q, e, _mm256_set1_ps(1.f));
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));
}

}  // namespace accel::cpu

#endif
