// bf16 GEMM tiles on AVX512-BF16 for the fused MoE (see bf16_tiles.h).
#include "fused_moe/cpu/bf16_tiles.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#include "common/cpu_isa.h"

#if defined(ACCEL_HAVE_AVX512_TARGET)
#include <immintrin.h>
#endif

namespace accel::fused_moe::bf16_tiles {

namespace {

inline uint32_t load_pair(const c10::BFloat16* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline uint32_t bits(c10::BFloat16 v) { return v.x; }

}  // namespace

void pack_panel(const c10::BFloat16* const* rows, int64_t count, int64_t width, int64_t K, c10::BFloat16* dst) {
  const int64_t kp = pairs(K), full = K / 2;
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t t = 0; t < count; ++t) {
    const c10::BFloat16* row = rows[t];
    uint32_t* col = out + t;
    for (int64_t q = 0; q < full; ++q) col[q * width] = load_pair(row + 2 * q);
    if (K & 1) col[full * width] = bits(row[K - 1]);  // high half (element K) zero
  }
  for (int64_t q = 0; q < kp; ++q) std::fill(out + q * width + count, out + (q + 1) * width, 0u);
}

#if defined(ACCEL_HAVE_AVX512_TARGET)
namespace {
// 16 tokens of a feature pair: (bf16(lo[t]), bf16(hi[t])) as one 32-bit word each, rounded to
// nearest even as c10::BFloat16 rounds
ACCEL_AVX512BF16_TARGET inline void pair16(const float* lo, const float* hi, uint32_t* out, __mmask16 m) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, lo)));
  const __m512i h = hi ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, hi)))
                       : _mm512_setzero_si512();
  _mm512_storeu_si512(out, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
}
}  // namespace
#endif

void pack_feature_pair(const float* src0, const float* src1, int64_t n, int64_t K, int64_t k0, c10::BFloat16* dst) {
#if defined(ACCEL_HAVE_AVX512_TARGET)
  TORCH_CHECK(cpu::cpu_has_avx512_bf16(), "fused_moe: bf16 tiles need AVX512-BF16");
  const int64_t q = k0 / 2;
  for (int64_t p = 0; p * kPanel < n; ++p) {
    const int64_t t0 = p * kPanel, width = panel_width(n, p), cnt = std::min(kPanel, n - t0);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst + panel_offset(p, K)) + q * width;
    // the panel's padding tokens come out zero (masked loads): their output columns are never
    // read, but no workspace garbage goes through the kernel
    for (int64_t t = 0; t < width; t += 16) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, cnt - t));
      const __mmask16 m = static_cast<__mmask16>((1u << left) - 1u);
      pair16(src0 + t0 + t, src1 ? src1 + t0 + t : nullptr, out + t, m);
    }
  }
#else
  (void)src0, (void)src1, (void)n, (void)K, (void)k0, (void)dst;
  TORCH_CHECK(false, "fused_moe: bf16 tiles need an x86-64 build with AVX512-BF16");
#endif
}

#if defined(ACCEL_HAVE_AVX512_TARGET)
namespace {

// GCC 12 flags the _mm512_undefined_*() pass-through inside its own unmasked intrinsics
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// C (MR x 16 NV, ld ldc) = A (MR rows, ld lda, K elements) x one packed panel of 16 NV tokens.
// prefetch: null, or the next register block's rows (contiguous, 8 rows of K): 32 bytes of it per
// pair step bring it into L2 by the end of this call.
template <int MR, int NV>
ACCEL_AVX512BF16_TARGET void kernel(const c10::BFloat16* A, int64_t lda, int64_t K, const c10::BFloat16* B,
                                    float* C, int64_t ldc, const char* prefetch) {
  constexpr int64_t kStep = 32 * NV;  // elements of B per pair step
  const int64_t full = K / 2;
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < full; ++q) {
    if (prefetch && (q & 1) == 0) _mm_prefetch(prefetch + q * 32, _MM_HINT_T1);
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + q * kStep + 32 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(A + m * lda + 2 * q)));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, b[v]);
    }
  }
  if (K & 1) {  // the last element alone: its pair's high half is zero in both operands
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + full * kStep + 32 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(bits(A[m * lda + K - 1])));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + 16 * v, acc[m][v]);
  }
}
#pragma GCC diagnostic pop

using Kernel = void (*)(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, float*, int64_t,
                       const char*);

template <int MR>
constexpr Kernel pick(int nv) {
  return nv == 1 ? &kernel<MR, 1> : nv == 2 ? &kernel<MR, 2> : &kernel<MR, 3>;
}

Kernel kernel_for(int64_t mr, int64_t nv) {
  static const Kernel table[8][3] = {
      {pick<1>(1), pick<1>(2), pick<1>(3)}, {pick<2>(1), pick<2>(2), pick<2>(3)},
      {pick<3>(1), pick<3>(2), pick<3>(3)}, {pick<4>(1), pick<4>(2), pick<4>(3)},
      {pick<5>(1), pick<5>(2), pick<5>(3)}, {pick<6>(1), pick<6>(2), pick<6>(3)},
      {pick<7>(1), pick<7>(2), pick<7>(3)}, {pick<8>(1), pick<8>(2), pick<8>(3)}};
  return table[mr - 1][nv - 1];
}

constexpr int64_t kRows = 8;                     // feature rows per register block
constexpr int64_t kGroupBytes = 512 * 1024;      // B panels one pass over A's rows reuses (L2)

}  // namespace
#endif

void gemm(const c10::BFloat16* A, int64_t lda, int64_t rows, int64_t K, const c10::BFloat16* packed, int64_t n,
          float* C, int64_t ldc) {
#if defined(ACCEL_HAVE_AVX512_TARGET)
  TORCH_CHECK(cpu::cpu_has_avx512_bf16(), "fused_moe: bf16 tiles need AVX512-BF16");
  const int64_t np = panels(n);
  const int64_t panel_bytes = kPanel * 2 * pairs(K) * 2;
  const int64_t group = std::max<int64_t>(1, kGroupBytes / std::max<int64_t>(panel_bytes, 1));
  // a pass of register blocks over a group of panels: the block's rows stay in L1 across the
  // group's panels, the panels in L2 across the blocks
  for (int64_t p0 = 0; p0 < np; p0 += group) {
    const int64_t p1 = std::min(np, p0 + group);
    for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
      const int64_t mr = std::min(kRows, rows - m0);
      // the first panel's pass also fetches the next block's rows (from memory: the weights are
      // read once per call) while this block computes
      const bool next = m0 + kRows < rows;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t nv = panel_width(n, p) / 16;
        const char* pf = p == p0 && next ? reinterpret_cast<const char*>(A + (m0 + kRows) * lda) : nullptr;
        kernel_for(mr, nv)(A + m0 * lda, lda, K, packed + panel_offset(p, K), C + m0 * ldc + p * kPanel, ldc, pf);
      }
    }
  }
#else
  (void)A, (void)lda, (void)rows, (void)K, (void)packed, (void)n, (void)C, (void)ldc;
  TORCH_CHECK(false, "fused_moe: bf16 tiles need an x86-64 build with AVX512-BF16");
#endif
}

}  // namespace accel::fused_moe::bf16_tiles
