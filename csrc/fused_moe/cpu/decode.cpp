// Fused MoE forward, streaming tasks: an expert with few tokens (a decode step's) reads each of
// its weight rows once from memory and dots it with its tokens' vectors, which stay in L1, so
// the tasks are bound by the weights' read bandwidth. AVX-512 and AVX512-BF16 variants are
// chosen at run time (common/cpu_isa.h).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common/cpu_isa.h"
#include "fused_moe/cpu/fused_moe_cpu.h"

namespace accel::fused_moe::moe_cpu {
namespace {

// Calls f(std::integral_constant<int, NT>{}, t0) for n tokens in register blocks [t0, t0 + NT)
// of up to 4.
template <typename F>
inline void token_blocks(int64_t n, const F& f) {
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    switch (std::min<int64_t>(4, n - t0)) {
      case 4: f(std::integral_constant<int, 4>{}, t0); break;
      case 3: f(std::integral_constant<int, 3>{}, t0); break;
      case 2: f(std::integral_constant<int, 2>{}, t0); break;
      default: f(std::integral_constant<int, 1>{}, t0); break;
    }
  }
}

inline float hsum(const Vec& v) {
  alignas(64) float tmp[kV];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kV; ++i) s += tmp[i];
  return s;
}

// Two float vectors (2 kV elements) from p.
inline void load2(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + kV);
}
inline void load2(const c10::BFloat16* p, Vec& a, Vec& b) {
  std::tie(a, b) = at::vec::convert_bfloat16_float(Vectorized<c10::BFloat16>::loadu(p));
}
inline void load2(const c10::Half* p, Vec& a, Vec& b) {
  std::tie(a, b) = at::vec::convert_half_float(Vectorized<c10::Half>::loadu(p));
}

// res[t * ld_res + (r - r0)] = w[r, :] . x[t, :] for rows r in [r0, r1) and the NT token vectors
// x (row stride K). Each weight row is read once for all NT tokens.
template <typename T, int NT, typename acc_t>
void dot_rows(const T* w, int64_t K, int64_t r0, int64_t r1, const acc_t* x, acc_t* res, int64_t ld_res) {
  if constexpr (std::is_same_v<acc_t, double>) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = w + r * K;
      for (int t = 0; t < NT; ++t) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += static_cast<double>(row[k]) * x[t * K + k];
        res[t * ld_res + (r - r0)] = s;
      }
    }
  } else {
    const int64_t kv = K - K % (2 * kV);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = w + r * K;
      Vec acc[NT];
      for (int t = 0; t < NT; ++t) acc[t] = Vec(0.f);
      for (int64_t k = 0; k < kv; k += 2 * kV) {
        Vec a, b;
        load2(row + k, a, b);
        for (int t = 0; t < NT; ++t) {
          acc[t] = at::vec::fmadd(a, Vec::loadu(x + t * K + k), acc[t]);
          acc[t] = at::vec::fmadd(b, Vec::loadu(x + t * K + k + kV), acc[t]);
        }
      }
      for (int t = 0; t < NT; ++t) {
        float s = hsum(acc[t]);
        for (int64_t k = kv; k < K; ++k) s += static_cast<float>(row[k]) * x[t * K + k];
        res[t * ld_res + (r - r0)] = s;
      }
    }
  }
}

#ifdef ACCEL_HAVE_AVX512_TARGET
// GCC 12 flags the _mm512_undefined_*() pass-through of its own unmasked AVX-512 intrinsics as
// uninitialised once they are inlined here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// dot_rows with AVX-512 for float and bf16 weights (bf16 widened by a shift): 16 lanes, two
// accumulators per token, masked tails. The decode path is bound by reading the weights; this
// halves the instructions per byte of the AVX2 loop, which matters for bf16.
ACCEL_AVX512_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
ACCEL_AVX512_TARGET inline __m512 load16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
ACCEL_AVX512_TARGET inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
ACCEL_AVX512_TARGET inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Streaming tasks ask for the weight bytes this far ahead (into L2): more reads in flight than the
// hardware prefetcher alone keeps, which restarts at every 4 KiB page.
constexpr int64_t kRowPrefetch = 2048;
// And at the start of each 4 KiB page, one line of the page this far ahead: its address
// translation (a page walk, nested under a hypervisor) then overlaps the reads before it instead of
// stalling the stream at the page's first load.
constexpr int64_t kPageAhead = 32768;

// Whether the load at p is the first of its 4 KiB page in a loop that moves `step` bytes a time.
inline bool page_start(const void* p, int64_t step) {
  return (reinterpret_cast<uintptr_t>(p) & 4095) < static_cast<uintptr_t>(step);
}

template <typename T, int NT>
ACCEL_AVX512_TARGET void dot_rows_avx512(const T* w, int64_t K, int64_t r0, int64_t r1, const float* x, float* res,
                                         int64_t ld_res) {
  const int64_t k2 = K - K % 32;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = w + r * K;
    __m512 a0[NT], a1[NT];
    for (int t = 0; t < NT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < k2; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + kRowPrefetch, _MM_HINT_T1);
      if (page_start(row + k, 32 * sizeof(T))) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPageAhead, _MM_HINT_T1);
      }
      const __m512 w0 = load16(row + k), w1 = load16(row + k + 16);
      for (int t = 0; t < NT; ++t) {
        a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * K + k), a0[t]);
        a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * K + k + 16), a1[t]);
      }
    }
    for (; k < K; k += 16) {
      const int64_t left = K - k;
      const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
      const __m512 w0 = load16(row + k, m);
      for (int t = 0; t < NT; ++t) a0[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + t * K + k), a0[t]);
    }
    for (int t = 0; t < NT; ++t) res[t * ld_res + (r - r0)] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
  }
}

// bf16 weights and bf16 activations with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs into 16
// fp32 lanes, so a weight row is consumed straight from memory (no widening), one instruction per
// 32 weights and token. Activations: token t's row at x[t] (bf16; the hidden row itself for the
// up projection, h rounded to bf16 for the down projection, as the eager bf16 loop rounds it).

template <int NT>
ACCEL_AVX512BF16_TARGET void dot_rows_bf16dp(const c10::BFloat16* w, int64_t K, int64_t r0, int64_t r1,
                                             const c10::BFloat16* const* x, float* res, int64_t ld_res) {
  const int64_t k2 = K - K % 64;
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* row = w + r * K;
    __m512 a0[NT], a1[NT];
    for (int t = 0; t < NT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < k2; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + kRowPrefetch, _MM_HINT_T1);
      if (page_start(row + k, 128)) _mm_prefetch(reinterpret_cast<const char*>(row + k) + kPageAhead, _MM_HINT_T1);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + k), w1 = (__m512bh)_mm512_loadu_si512(row + k + 32);
      for (int t = 0; t < NT; ++t) {
        a0[t] = _mm512_dpbf16_ps(a0[t], w0, (__m512bh)_mm512_loadu_si512(x[t] + k));
        a1[t] = _mm512_dpbf16_ps(a1[t], w1, (__m512bh)_mm512_loadu_si512(x[t] + k + 32));
      }
    }
    for (; k < K; k += 32) {
      const int64_t left = K - k;
      const __mmask32 m = left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << left) - 1u);
      const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, row + k);
      for (int t = 0; t < NT; ++t) a0[t] = _mm512_dpbf16_ps(a0[t], w0, (__m512bh)_mm512_maskz_loadu_epi16(m, x[t] + k));
    }
    for (int t = 0; t < NT; ++t) res[t * ld_res + (r - r0)] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
  }
}

// dot_rows_bf16dp over n tokens, in register blocks of up to 4.
void dot_rows_bf16dp_n(const c10::BFloat16* w, int64_t K, int64_t r0, int64_t r1, const c10::BFloat16* const* x,
                       int64_t n, float* res, int64_t ld_res) {
  token_blocks(n, [&](auto nt, int64_t t0) {
    dot_rows_bf16dp<decltype(nt)::value>(w, K, r0, r1, x + t0, res + t0 * ld_res, ld_res);
  });
}
#pragma GCC diagnostic pop
#endif

// dot_rows over n tokens (any n), in register blocks of up to 4.
template <typename T, typename acc_t>
void dot_rows_n(const T* w, int64_t K, int64_t r0, int64_t r1, const acc_t* x, int64_t n, acc_t* res,
                int64_t ld_res) {
#ifdef ACCEL_HAVE_AVX512_TARGET
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (cpu::cpu_has_avx512()) {
      token_blocks(n, [&](auto nt, int64_t t0) {
        dot_rows_avx512<T, decltype(nt)::value>(w, K, r0, r1, x + t0 * K, res + t0 * ld_res, ld_res);
      });
      return;
    }
  }
#endif
  token_blocks(n, [&](auto nt, int64_t t0) {
    dot_rows<T, decltype(nt)::value>(w, K, r0, r1, x + t0 * K, res + t0 * ld_res, ld_res);
  });
}

}  // namespace

template <typename T>
bool use_bf16dp() {
#ifdef ACCEL_HAVE_AVX512_TARGET
  if constexpr (std::is_same_v<T, c10::BFloat16>) return cpu::cpu_has_avx512_bf16();
#endif
  return false;
}

template <typename T>
void stream_up_task(ForwardCtx<T>& c, int64_t e, int64_t j0, int64_t j1) {
  using acc_t = typename ForwardCtx<T>::acc_t;
  const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
  const T* w = c.w1 + e * 2 * I * H;
  const int64_t rows = j1 - j0;
  acc_t gv[4 * kStreamRows], uv[4 * kStreamRows], hv[4 * kStreamRows];
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, n - t0);
#ifdef ACCEL_HAVE_AVX512_TARGET
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (c.bf16dp) {
        const c10::BFloat16* xs[4];
        for (int64_t t = 0; t < nt; ++t) xs[t] = c.x + c.token(s0 + t0 + t) * H;
        dot_rows_bf16dp_n(w, H, j0, j1, xs, nt, gv, kStreamRows);
        dot_rows_bf16dp_n(w, H, I + j0, I + j1, xs, nt, uv, kStreamRows);
        up_epilogue<T, acc_t>(c, s0 + t0, nt, j0, rows, gv, uv, hv, kStreamRows, 1);
        for (int64_t t = 0; t < nt; ++t) {
          cpu::convert_n(hv + t * kStreamRows, c.hlow.data() + c.hoff[e] + (t0 + t) * I + j0, rows);
        }
        continue;
      }
    }
#endif
    const acc_t* x = c.xbuf.data() + c.xoff[e] + t0 * H;
    dot_rows_n<T, acc_t>(w, H, j0, j1, x, nt, gv, kStreamRows);
    dot_rows_n<T, acc_t>(w, H, I + j0, I + j1, x, nt, uv, kStreamRows);
    up_epilogue<T, acc_t>(c, s0 + t0, nt, j0, rows, gv, uv, hv, kStreamRows, 1);
    for (int64_t t = 0; t < nt; ++t) {
      std::copy(hv + t * kStreamRows, hv + t * kStreamRows + rows, c.hbuf.data() + c.hoff[e] + (t0 + t) * I + j0);
    }
  }
}

template <typename T>
void stream_down_task(ForwardCtx<T>& c, int64_t e, int64_t h0, int64_t h1) {
  using acc_t = typename ForwardCtx<T>::acc_t;
  const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
  const T* w = c.w2 + e * H * I;
  acc_t yv[4 * kStreamRows];
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, n - t0);
#ifdef ACCEL_HAVE_AVX512_TARGET
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (c.bf16dp) {
        const c10::BFloat16* hs[4];
        for (int64_t t = 0; t < nt; ++t) hs[t] = c.hlow.data() + c.hoff[e] + (t0 + t) * I;
        dot_rows_bf16dp_n(w, I, h0, h1, hs, nt, yv, kStreamRows);
      } else {
        dot_rows_n<T, acc_t>(w, I, h0, h1, c.hbuf.data() + c.hoff[e] + t0 * I, nt, yv, kStreamRows);
      }
    } else
#endif
    {
      dot_rows_n<T, acc_t>(w, I, h0, h1, c.hbuf.data() + c.hoff[e] + t0 * I, nt, yv, kStreamRows);
    }
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t p = c.r.order[s0 + t0 + t];
      scale_n<acc_t>(yv + t * kStreamRows, c.weight(p), c.ypair + p * H + h0, h1 - h0);
    }
  }
}

#define INSTANTIATE_STREAM_TASKS(T)                                           \
  template bool use_bf16dp<T>();                                              \
  template void stream_up_task<T>(ForwardCtx<T>&, int64_t, int64_t, int64_t); \
  template void stream_down_task<T>(ForwardCtx<T>&, int64_t, int64_t, int64_t);
INSTANTIATE_STREAM_TASKS(float)
INSTANTIATE_STREAM_TASKS(double)
INSTANTIATE_STREAM_TASKS(c10::BFloat16)
INSTANTIATE_STREAM_TASKS(c10::Half)
#undef INSTANTIATE_STREAM_TASKS

}  // namespace accel::fused_moe::moe_cpu
