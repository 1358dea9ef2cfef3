// bf16 GEMM tiles on AVX512-BF16 for the fused MoE (see bf16_tiles.h).
#include "fused_moe/cpu/bf16_tiles.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "common/cpu_avx512_math.h"
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
// GCC 12 flags the _mm512_undefined_*() pass-through of its own unmasked AVX-512 intrinsics as
// uninitialised once they are inlined here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 16 tokens of a feature pair: (bf16(lo[t]), bf16(hi[t])) as one 32-bit word each, rounded to
// nearest even as c10::BFloat16 rounds
ACCEL_AVX512BF16_TARGET inline __m512i pair_words(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}
// up to 16 tokens (store mask `st`; lanes of `ld` loaded, the rest zero)
ACCEL_AVX512BF16_TARGET inline void pair16(const float* lo, const float* hi, uint32_t* out, __mmask16 ld,
                                           __mmask16 st) {
  const __m512 h = hi ? _mm512_maskz_loadu_ps(ld, hi) : _mm512_setzero_ps();
  _mm512_mask_storeu_epi32(out, st, pair_words(_mm512_maskz_loadu_ps(ld, lo), h));
}
#pragma GCC diagnostic pop
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
      const int64_t chunk = std::min<int64_t>(16, width - t);  // 16, or 8 at an odd multiple of 8
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(chunk, cnt - t));
      const __mmask16 ld = static_cast<__mmask16>((1u << left) - 1u);
      const __mmask16 st = static_cast<__mmask16>((1u << chunk) - 1u);
      pair16(src0 + t0 + t, src1 ? src1 + t0 + t : nullptr, out + t, ld, st);
    }
  }
#else
  (void)src0, (void)src1, (void)n, (void)K, (void)k0, (void)dst;
  TORCH_CHECK(false, "fused_moe: bf16 tiles need an x86-64 build with AVX512-BF16");
#endif
}

#if defined(ACCEL_HAVE_AVX512_TARGET)
namespace {

// GCC 12 flags the _mm512_undefined_*() pass-through of its own unmasked AVX-512 intrinsics as
// uninitialised once they are inlined here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// A panel of width 8 W8 tokens runs as NV = W8 / 2 zmm vectors of 16 tokens and, for odd W8, one ymm
// vector of 8 (vdpbf16ps on 256 bits: the same rate per token), so that an expert's last tokens
// are padded to 8, not 16.
template <int W8>
struct Cols {
  static constexpr int kNV = W8 / 2;
  static constexpr bool kHalf = W8 % 2 == 1;
  static constexpr int kArr = kNV > 0 ? kNV : 1;  // array extent (no zero-length arrays)
  static constexpr int64_t kStep = 16 * W8;        // bf16 elements of the packed panel per pair step
};

// One pair step's B operand: the panel's NV vectors of 16 tokens (and the odd 8 as a ymm).
template <int W8>
ACCEL_AVX512BF16_TARGET __attribute__((always_inline)) inline void load_step(const c10::BFloat16* Bq, __m512bh* b,
                                                                             __m256bh& bh) {
  using Co = Cols<W8>;
#pragma GCC unroll 4
  for (int v = 0; v < Co::kNV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(Bq + 32 * v);
  if constexpr (Co::kHalf) bh = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(Bq + 32 * Co::kNV));
}

// acc += the pair w (broadcast) times the step's B vectors, for one row of the register block.
template <int W8>
ACCEL_AVX512BF16_TARGET __attribute__((always_inline)) inline void dp_step(uint32_t w, const __m512bh* b, __m256bh bh,
                                                                           __m512* acc, __m256& acch) {
  using Co = Cols<W8>;
  const __m512i a = _mm512_set1_epi32(static_cast<int>(w));
#pragma GCC unroll 4
  for (int v = 0; v < Co::kNV; ++v) acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)a, b[v]);
  if constexpr (Co::kHalf) acch = _mm256_dpbf16_ps(acch, (__m256bh)_mm512_castsi512_si256(a), bh);
}

// C (MR x 8 W8, ld ldc) = A (MR rows, ld lda, K elements) x one packed panel of 8 W8 tokens.
// prefetch: null, or the next register block's rows (contiguous, 8 rows of K): 32 bytes of it per
// pair step bring it into L2 by the end of this call.
template <int MR, int W8>
ACCEL_AVX512BF16_TARGET void kernel(const c10::BFloat16* A, int64_t lda, int64_t K, const c10::BFloat16* B,
                                    float* C, int64_t ldc, const char* prefetch) {
  using Co = Cols<W8>;
  constexpr int NV = Co::kNV;
  const int64_t full = K / 2;
  __m512 acc[MR][Co::kArr];
  __m256 acch[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
    acch[m] = _mm256_setzero_ps();
  }
  // one pair step: pair (k, k + 1) of the rows, or (lone) element k alone, K's odd last element
  // (its pair's high half is zero in both operands)
  auto step = [&](int64_t k, const c10::BFloat16* Bq, bool lone) ACCEL_AVX512BF16_TARGET {
    __m512bh b[Co::kArr];
    __m256bh bh;
    load_step<W8>(Bq, b, bh);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      dp_step<W8>(lone ? bits(A[m * lda + k]) : load_pair(A + m * lda + k), b, bh, acc[m], acch[m]);
    }
  };
  for (int64_t q = 0; q < full; ++q) {
    if (prefetch && (q & 1) == 0) _mm_prefetch(prefetch + q * 32, _MM_HINT_T1);
    step(2 * q, B + q * Co::kStep, false);
  }
  if (K & 1) step(K - 1, B + full * Co::kStep, true);
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + 16 * v, acc[m][v]);
    if constexpr (Co::kHalf) _mm256_storeu_ps(C + m * ldc + 16 * NV, acch[m]);
  }
}
// act(z) in fp32, as activation_forward: SiLU z / (1 + e^-z); GELU 0.5 z (1 + erf(z / sqrt 2)) with
// erf from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, as cpu_vec.h's erf_vec); ReLU; none.
// NaN stays NaN (the min/max operand order below keeps it), +-inf as torch has them.
ACCEL_AVX512BF16_TARGET inline __m512 activate(__m512 z, Activation act) {
  constexpr float kLog2e = 1.4426950408889634f;
  switch (act) {
    case Activation::Silu: {
      // e^-z = 2^(-z log2 e), the exponent clamped to [-160, 160] (0 and inf after scaling) so that
      // infinite z gives 0 / inf, not NaN, from the reduction
      __m512 t = _mm512_mul_ps(z, _mm512_set1_ps(-kLog2e));
      t = _mm512_max_ps(_mm512_set1_ps(-160.f), _mm512_min_ps(_mm512_set1_ps(160.f), t));
      return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.f), cpu::exp2_avx512(t)));
    }
    case Activation::Gelu: {
      const __m512 one = _mm512_set1_ps(1.f);
      const __m512 x = _mm512_mul_ps(z, _mm512_set1_ps(0.70710678118654752440f));
      const __m512 a = _mm512_min_ps(_mm512_set1_ps(4.f), _mm512_abs_ps(x));  // erf(4) is 1 in fp32
      const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(kErfAS[0]), a, one));
      __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kErfAS[5]), t, _mm512_set1_ps(kErfAS[4]));
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kErfAS[3]));
      p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kErfAS[2]));
      p = _mm512_mul_ps(_mm512_fmadd_ps(p, t, _mm512_set1_ps(kErfAS[1])), t);
      const __m512 e = cpu::exp2_avx512(_mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-kLog2e)));
      const __m512 y = _mm512_fnmadd_ps(p, e, one);  // erf(|x|) >= 0: x's sign goes on by bits
      const __m512 erf = _mm512_or_ps(y, _mm512_and_ps(x, _mm512_set1_ps(-0.f)));
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), z), _mm512_add_ps(one, erf));
    }
    case Activation::Relu:
      return _mm512_max_ps(_mm512_setzero_ps(), z);
    default:
      return z;
  }
}

// gemm_glu's block: MF features' gate rows G and up rows U (ld lda, K elements) x one packed panel
// of 8 W8 tokens; h = act(g) u goes out as (MF + 1) / 2 feature pairs of the packed h block: pair
// i's 8 W8 words at out + i * width. pf_g, pf_u: null, or the next block's gate and up rows
// (contiguous, MF rows of K each), fetched into L2 64 bytes of each every 4 pair steps.
template <int MF, int W8>
ACCEL_AVX512BF16_TARGET void glu_kernel(const c10::BFloat16* G, const c10::BFloat16* U, int64_t lda, int64_t K,
                                        const c10::BFloat16* B, Activation act, uint32_t* out, int64_t width,
                                        const char* pf_g, const char* pf_u) {
  using Co = Cols<W8>;
  constexpr int NV = Co::kNV;
  const int64_t full = K / 2;
  __m512 ag[MF][Co::kArr], au[MF][Co::kArr];
  __m256 agh[MF], auh[MF];
#pragma GCC unroll 4
  for (int m = 0; m < MF; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) ag[m][v] = au[m][v] = _mm512_setzero_ps();
    agh[m] = auh[m] = _mm256_setzero_ps();
  }
  auto step = [&](int64_t k, const c10::BFloat16* Bq, bool lone) ACCEL_AVX512BF16_TARGET {
    __m512bh b[Co::kArr];
    __m256bh bh;
    load_step<W8>(Bq, b, bh);
#pragma GCC unroll 4
    for (int m = 0; m < MF; ++m) {
      dp_step<W8>(lone ? bits(G[m * lda + k]) : load_pair(G + m * lda + k), b, bh, ag[m], agh[m]);
      dp_step<W8>(lone ? bits(U[m * lda + k]) : load_pair(U + m * lda + k), b, bh, au[m], auh[m]);
    }
  };
  for (int64_t q = 0; q < full; ++q) {
    if (pf_g && (q & 3) == 0) {
      _mm_prefetch(pf_g + q * 16, _MM_HINT_T1);
      _mm_prefetch(pf_u + q * 16, _MM_HINT_T1);
    }
    step(2 * q, B + q * Co::kStep, false);
  }
  if (K & 1) step(K - 1, B + full * Co::kStep, true);
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int m = 0; m < MF; m += 2) {
    const bool pair = m + 1 < MF;  // else the lone last feature of an odd I: high half zero
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 lo = _mm512_mul_ps(activate(ag[m][v], act), au[m][v]);
      const __m512 hi = pair ? _mm512_mul_ps(activate(ag[m + 1][v], act), au[m + 1][v]) : zero;
      _mm512_storeu_si512(out + (m / 2) * width + 16 * v, pair_words(lo, hi));
    }
    if constexpr (Co::kHalf) {  // 8 tokens, activated in the low half of a zmm (the rest zero)
      const __m512 lo = _mm512_mul_ps(activate(_mm512_zextps256_ps512(agh[m]), act), _mm512_zextps256_ps512(auh[m]));
      const __m512 hi = pair ? _mm512_mul_ps(activate(_mm512_zextps256_ps512(agh[m + 1]), act),
                                             _mm512_zextps256_ps512(auh[m + 1]))
                             : zero;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m / 2) * width + 16 * NV),
                          _mm512_castsi512_si256(pair_words(lo, hi)));
    }
  }
}

using GluKernel = void (*)(const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*,
                           Activation, uint32_t*, int64_t, const char*, const char*);
using Kernel = void (*)(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, float*, int64_t,
                       const char*);

constexpr int kMaxW8 = kPanel / 8;  // panel widths 8 .. 48 tokens

template <int MR, int... W>
constexpr std::array<Kernel, kMaxW8> kernel_row(std::integer_sequence<int, W...>) {
  return {&kernel<MR, W + 1>...};
}
template <int... M>
constexpr std::array<std::array<Kernel, kMaxW8>, sizeof...(M)> kernel_table(std::integer_sequence<int, M...>) {
  return {kernel_row<M + 1>(std::make_integer_sequence<int, kMaxW8>{})...};
}
template <int MF, int... W>
constexpr std::array<GluKernel, kMaxW8> glu_row(std::integer_sequence<int, W...>) {
  return {&glu_kernel<MF, W + 1>...};
}
template <int... M>
constexpr std::array<std::array<GluKernel, kMaxW8>, sizeof...(M)> glu_table(std::integer_sequence<int, M...>) {
  return {glu_row<M + 1>(std::make_integer_sequence<int, kMaxW8>{})...};
}

// mr rows (1-8) x a panel of `width` tokens (a multiple of 8, at most kPanel)
Kernel kernel_for(int64_t mr, int64_t width) {
  static constexpr auto table = kernel_table(std::make_integer_sequence<int, 8>{});
  return table[mr - 1][width / 8 - 1];
}
GluKernel glu_kernel_for(int64_t mf, int64_t width) {
  static constexpr auto table = glu_table(std::make_integer_sequence<int, 4>{});
  return table[mf - 1][width / 8 - 1];
}
#pragma GCC diagnostic pop

constexpr int64_t kRows = 8;                     // feature rows per register block
constexpr int64_t kGluRows = 4;                  // gemm_glu: features (gate and up rows) per block
constexpr int64_t kGroupBytes = 512 * 1024;      // B panels one pass over A's rows reuses (L2)

}  // namespace
#endif

void gemm(const c10::BFloat16* A, int64_t lda, int64_t rows, int64_t K, const c10::BFloat16* packed, int64_t n,
          float* C, int64_t ldc, const c10::BFloat16* then) {
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
      // read once per call) while this block computes; the very last block, `then`
      const c10::BFloat16* next = m0 + kRows < rows ? A + (m0 + kRows) * lda : p1 == np ? then : nullptr;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t width = panel_width(n, p);
        const char* pf = p == p0 ? reinterpret_cast<const char*>(next) : nullptr;
        kernel_for(mr, width)(A + m0 * lda, lda, K, packed + panel_offset(p, K), C + m0 * ldc + p * kPanel, ldc, pf);
      }
    }
  }
#else
  (void)A, (void)lda, (void)rows, (void)K, (void)packed, (void)n, (void)C, (void)ldc;
  TORCH_CHECK(false, "fused_moe: bf16 tiles need an x86-64 build with AVX512-BF16");
#endif
}

void gemm_glu(const c10::BFloat16* Wg, const c10::BFloat16* Wu, int64_t lda, int64_t rows, int64_t K,
              const c10::BFloat16* packed, int64_t n, Activation act, c10::BFloat16* hpacked, int64_t I,
              int64_t j0, const c10::BFloat16* then_g, const c10::BFloat16* then_u) {
#if defined(ACCEL_HAVE_AVX512_TARGET)
  TORCH_CHECK(cpu::cpu_has_avx512_bf16(), "fused_moe: bf16 tiles need AVX512-BF16");
  TORCH_CHECK(j0 % 2 == 0 && (rows % 2 == 0 || j0 + rows == I), "fused_moe: gemm_glu splits a feature pair");
  const int64_t np = panels(n);
  const int64_t panel_bytes = kPanel * 2 * pairs(K) * 2;
  const int64_t group = std::max<int64_t>(1, kGroupBytes / std::max<int64_t>(panel_bytes, 1));
  for (int64_t p0 = 0; p0 < np; p0 += group) {
    const int64_t p1 = std::min(np, p0 + group);
    for (int64_t m0 = 0; m0 < rows; m0 += kGluRows) {
      const int64_t mf = std::min(kGluRows, rows - m0);
      const bool inner = m0 + kGluRows < rows;
      const c10::BFloat16* next_g = inner ? Wg + (m0 + kGluRows) * lda : p1 == np && then_u ? then_g : nullptr;
      const c10::BFloat16* next_u = inner ? Wu + (m0 + kGluRows) * lda : p1 == np && then_g ? then_u : nullptr;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t width = panel_width(n, p);
        const bool pf = p == p0 && next_g;
        uint32_t* out = reinterpret_cast<uint32_t*>(hpacked + panel_offset(p, I)) + (j0 + m0) / 2 * width;
        glu_kernel_for(mf, width)(Wg + m0 * lda, Wu + m0 * lda, lda, K, packed + panel_offset(p, K), act, out,
                                       width, pf ? reinterpret_cast<const char*>(next_g) : nullptr,
                                       pf ? reinterpret_cast<const char*>(next_u) : nullptr);
      }
    }
  }
#else
  (void)Wg, (void)Wu, (void)lda, (void)rows, (void)K, (void)packed, (void)n, (void)act, (void)hpacked, (void)I,
      (void)j0;
  TORCH_CHECK(false, "fused_moe: bf16 tiles need an x86-64 build with AVX512-BF16");
#endif
}

}  // namespace accel::fused_moe::bf16_tiles
