// CPU kernels for the fused MoE ops: routing, forward and backward.
//
// Forward, after a counting sort of the T k (token, slot) pairs by expert:
//   phase 1 (up):   for every active expert, gate and up rows of W1 against its tokens, then
//                   h = act(g) u                                  -> H buffer (fp32)
//   phase 2 (down): W2 rows against h, times the routing weight     -> one fp32 row per pair
//   phase 3:        out[t] = sum of the token's k pair rows (each token reduced by one thread:
//                   no atomics, a fixed order, so results are deterministic)
// Each phase is one parallel region over a task list in memory order (a contiguous range per
// thread, the leftovers taken from the ranges' ends), whatever the number of experts, so a decode
// step pays three parallel regions and no per-expert overhead.
//
// Two kinds of task. An expert with few tokens (decode) streams its weight rows once from memory
// and dots each row with its tokens' vectors, which stay in L1: bound by the weights' read
// bandwidth. An expert with many tokens runs tiles on brgemm in the transposed orientation,
// C^T (features x tokens) = W (features x K) X^T (K x tokens): the weights are read in place as
// the A operand (no packing of the big matrix), and only the small activation block is
// transposed. bf16/fp16 experts with many tokens use ATen's matmul instead (oneDNN's bf16/fp16
// kernels) where the CPU multiplies that dtype natively, with the activation, routing weight and
// combine still fused here; elsewhere they run the fp32 tiles on weights widened per task.
//
// Backward: per expert, ATen GEMMs on gathered rows (see fused_moe.h for the maths), with one
// pass over the expert's rows in between for the activation derivative, d topk_weights and the
// GEMM operands; the weight gradients written once into cached buffers, d hidden accumulated in fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/impl/alloc_cpu.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "common/activation.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/cpu_memory.h"
#include "common/cpu_vec.h"
#include "common/env.h"
#include "fused_moe/cpu/bf16_tiles.h"
#include "fused_moe/fused_moe.h"

namespace accel::fused_moe {
namespace {

using at::vec::Vectorized;
using Vec = Vectorized<float>;
constexpr int64_t kV = Vec::size();


// Experts with at most this many tokens stream their weights; more take the GEMM tiles.
int64_t stream_max_tokens() {
  static const int64_t v = env_int("ACCEL_MOE_STREAM_MAX_TOKENS", 8);
  return v;
}
constexpr int64_t kStreamRows = 32;  // weight rows per streaming task
constexpr int64_t kTileN = 32;       // output features per GEMM tile (A rows)
constexpr int64_t kTileT = 64;       // tokens per GEMM tile (B columns)

// C (rows x nt, ld kTileT) = A (rows x K, lda) B (K x nt, ld kTileT), over K in chunks so that the
// B block a chunk streams (kc x kTileT floats) stays in L2 while every row block of A passes over it.
inline void tile_gemm(int64_t rows, int64_t nt, int64_t K, int64_t lda, const float* A, const float* B, float* C) {
  static const int64_t kc = env_int("ACCEL_MOE_GEMM_KC", 512);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kk = std::min(kc, K - k0);
    at::native::cpublas::brgemm(rows, nt, kk, lda, kTileT, kTileT, k0 > 0, A + k0, B + k0 * kTileT, C, false);
  }
}

// Runs fn(i, guess) for i in [0, n) on the intra-op threads. Each worker owns a contiguous range
// of the indices, [n w / W, n (w + 1) / W), and takes it from the front; a worker whose range is
// done takes the other ranges' last indices, one at a time, until none is left (so a slow thread
// or uneven tasks still balance). Task lists are in memory order, so a worker streams one
// contiguous run of weight rows. In a microbenchmark of the bf16 decode step (2 threads) this read
// ~4% more bandwidth than taking the indices in turn while the memory was slow, and ~20% more
// while it was fast, when turn-taking reached only ~2/3 of a plain row reduction's bandwidth.
// guess: the index this thread will most likely take next (for prefetching its data); may be
// outside [0, n).
template <typename F>
void parallel_tasks(int64_t n, const F& fn) {
  if (n <= 0) return;
  if (n == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i, i + 1);
    return;
  }
  TORCH_CHECK(n < (int64_t(1) << 31), kOp, ": too many tasks (", n, ")");
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  // range w as (end << 32) | begin, one cache line each
  struct alignas(64) Range {
    std::atomic<uint64_t> v;
  };
  std::vector<Range> ranges(workers);
  for (int64_t w = 0; w < workers; ++w) {
    ranges[w].v.store((static_cast<uint64_t>(n * (w + 1) / workers) << 32) | static_cast<uint64_t>(n * w / workers),
                      std::memory_order_relaxed);
  }
  // claims one index of range r: its first (own range) or its last (another's); -1 once it is empty
  auto claim = [&](int64_t r, bool front) -> int64_t {
    uint64_t v = ranges[r].v.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
      if (lo >= hi) return -1;
      const uint64_t nv = front ? (hi << 32) | (lo + 1) : ((hi - 1) << 32) | lo;
      if (ranges[r].v.compare_exchange_weak(v, nv, std::memory_order_relaxed)) {
        return static_cast<int64_t>(front ? lo : hi - 1);
      }
    }
  };
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      for (int64_t i = claim(w, true); i >= 0; i = claim(w, true)) fn(i, i + 1);
      for (int64_t o = 1; o < workers; ++o) {
        const int64_t r = (w + o) % workers;
        for (int64_t i = claim(r, false); i >= 0; i = claim(r, false)) fn(i, i - 1);
      }
    }
  });
}

// ------------------------------------------------------------------ routing tables

struct Routing {
  int64_t tokens = 0, top_k = 0, experts = 0, pairs = 0;
  std::vector<int64_t> offsets;  // experts + 1: segment of expert e in sorted order
  std::vector<int64_t> order;    // sorted position -> pair index p = t * k + j
};

template <typename id_t>
void fill_routing(const id_t* ids, Routing& r) {
  std::vector<int64_t> count(r.experts + 1, 0);
  for (int64_t p = 0; p < r.pairs; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    TORCH_CHECK(e >= 0 && e < r.experts, kOp, ": topk_ids must be in [0, E) = [0, ", r.experts, "), found ", e,
                " at token ", p / r.top_k, ", slot ", p % r.top_k);
    ++count[e + 1];
  }
  r.offsets.assign(r.experts + 1, 0);
  for (int64_t e = 0; e < r.experts; ++e) r.offsets[e + 1] = r.offsets[e] + count[e + 1];
  std::vector<int64_t> fill(r.offsets.begin(), r.offsets.end() - 1);
  r.order.resize(r.pairs);
  for (int64_t p = 0; p < r.pairs; ++p) r.order[fill[static_cast<int64_t>(ids[p])]++] = p;
}

Routing make_routing(const at::Tensor& topk_ids, int64_t experts) {
  Routing r;
  r.tokens = topk_ids.size(0);
  r.top_k = topk_ids.size(1);
  r.experts = experts;
  r.pairs = r.tokens * r.top_k;
  const at::Tensor ids = topk_ids.contiguous();
  if (ids.scalar_type() == at::kLong) {
    fill_routing(ids.const_data_ptr<int64_t>(), r);
  } else {
    fill_routing(ids.const_data_ptr<int32_t>(), r);
  }
  return r;
}

// ------------------------------------------------------------------ vector helpers

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
// GCC 12 flags the _mm512_undefined_*() pass-through inside its own unmasked intrinsics
#pragma GCC diagnostic push
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
// hardware prefetcher alone keeps, which restarts at every 4 KiB page. Measured interleaved in the
// op (T 1 and 4, fp32 and bf16): 2-6% more read bandwidth, in all 8 comparisons.
constexpr int64_t kRowPrefetch = 2048;
// And at the start of each 4 KiB page, one line of the page this far ahead: its address
// translation (a page walk, nested under a hypervisor) then overlaps the reads before it instead of
// stalling the stream at the page's first load. Measured interleaved in the op against the same
// kernel without it (bf16 and fp32, T 1 and 4): +0-8% read bandwidth, +12% for fp32 T 4; 8 and
// 16 KiB ahead gained a little less.
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
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    switch (std::min<int64_t>(4, n - t0)) {
      case 4: dot_rows_bf16dp<4>(w, K, r0, r1, x + t0, res + t0 * ld_res, ld_res); break;
      case 3: dot_rows_bf16dp<3>(w, K, r0, r1, x + t0, res + t0 * ld_res, ld_res); break;
      case 2: dot_rows_bf16dp<2>(w, K, r0, r1, x + t0, res + t0 * ld_res, ld_res); break;
      default: dot_rows_bf16dp<1>(w, K, r0, r1, x + t0, res + t0 * ld_res, ld_res); break;
    }
  }
}
#pragma GCC diagnostic pop
#endif

// Whether the streaming tasks of this call take the AVX512-BF16 dot products (bf16 inputs only).
template <typename T>
bool use_bf16dp() {
#ifdef ACCEL_HAVE_AVX512_TARGET
  if constexpr (std::is_same_v<T, c10::BFloat16>) return cpu::cpu_has_avx512_bf16();
#endif
  return false;
}

// dot_rows over n tokens (any n), in register blocks of up to 4.
template <typename T, typename acc_t>
void dot_rows_n(const T* w, int64_t K, int64_t r0, int64_t r1, const acc_t* x, int64_t n, acc_t* res,
                int64_t ld_res) {
#ifdef ACCEL_HAVE_AVX512_TARGET
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (cpu::cpu_has_avx512()) {
      for (int64_t t0 = 0; t0 < n; t0 += 4) {
        const float* xt = x + t0 * K;
        float* rt = res + t0 * ld_res;
        switch (std::min<int64_t>(4, n - t0)) {
          case 4: dot_rows_avx512<T, 4>(w, K, r0, r1, xt, rt, ld_res); break;
          case 3: dot_rows_avx512<T, 3>(w, K, r0, r1, xt, rt, ld_res); break;
          case 2: dot_rows_avx512<T, 2>(w, K, r0, r1, xt, rt, ld_res); break;
          default: dot_rows_avx512<T, 1>(w, K, r0, r1, xt, rt, ld_res); break;
        }
      }
      return;
    }
  }
#endif
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    const acc_t* xt = x + t0 * K;
    acc_t* rt = res + t0 * ld_res;
    switch (std::min<int64_t>(4, n - t0)) {
      case 4: dot_rows<T, 4>(w, K, r0, r1, xt, rt, ld_res); break;
      case 3: dot_rows<T, 3>(w, K, r0, r1, xt, rt, ld_res); break;
      case 2: dot_rows<T, 2>(w, K, r0, r1, xt, rt, ld_res); break;
      default: dot_rows<T, 1>(w, K, r0, r1, xt, rt, ld_res); break;
    }
  }
}

template <typename acc_t>
inline acc_t act_fwd(acc_t z, Activation a) {
  return activation_forward<acc_t>(z, a);
}

// h[i] = act(g[i]) * u[i]
template <typename acc_t>
inline void act_mul(const acc_t* g, const acc_t* u, acc_t* h, int64_t n, Activation a) {
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; i + kV <= n; i += kV) {
      (cpu::activation_vec<float>(Vec::loadu(g + i), a) * Vec::loadu(u + i)).store(h + i);
    }
  }
  for (; i < n; ++i) h[i] = act_fwd<acc_t>(g[i], a) * u[i];
}

// y[i] = w * x[i]
template <typename acc_t>
inline void scale_n(const acc_t* x, acc_t w, acc_t* y, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    const Vec wv(w);
    for (; i + kV <= n; i += kV) (Vec::loadu(x + i) * wv).store(y + i);
  }
  for (; i < n; ++i) y[i] = w * x[i];
}

// ------------------------------------------------------------------ forward

// How an expert's tokens run: none routed; streaming its weight rows (few tokens); the fp32 brgemm
// tiles (fp32, or bf16/fp16 weights widened per task); the bf16 tiles; oneDNN per expert.
enum class Path : uint8_t { kNone, kStream, kTiles, kBf16Tiles, kAten };

// Uninitialised scratch of n elements (every element a kernel reads was written first; padding
// columns of the GEMM blocks hold garbage only in output columns that are never read). Large ones
// come from the CPU block cache, so that calls in a loop do not fault them in again; small ones
// (a decode step's) straight from the CPU allocator, without the cost of a tensor each; none for
// n = 0.
template <typename U>
struct Workspace {
  static constexpr int64_t kSmallBytes = int64_t(1) << 20;
  struct Free {
    void operator()(void* p) const { c10::free_cpu(p); }
  };
  at::Tensor storage;
  std::unique_ptr<void, Free> small;
  U* ptr = nullptr;
  void resize(int64_t n) {
    const int64_t bytes = n * static_cast<int64_t>(sizeof(U));
    storage.reset();
    small.reset();
    ptr = nullptr;
    if (bytes <= 0) return;
    if (bytes < kSmallBytes) {
      small.reset(c10::alloc_cpu(static_cast<size_t>(bytes)));
      ptr = static_cast<U*>(small.get());
    } else {
      storage = empty_workspace(bytes);
      ptr = reinterpret_cast<U*>(storage.data_ptr());
    }
  }
  U* data() const { return ptr; }
};

template <typename T>
struct ForwardCtx {
  using acc_t = at::opmath_type<T>;
  const Geometry& g;
  const Routing& r;
  Activation act;
  const T* x;           // (T, H)
  const T* w1;          // (E, 2I, H)
  const T* w2;          // (E, H, I)
  const float* wf = nullptr;  // routing weights, float32 (T k) ...
  const T* wt = nullptr;      // ... or in the hidden dtype
  T* cache = nullptr;         // (T k, 2I) or null
  std::vector<Path> path;     // per expert
  std::vector<int64_t> xoff, hoff;  // per expert: offsets into the buffers of its path (elements)
  Workspace<acc_t> xbuf;      // kStream: (n, H) rows; kTiles: (H x kTileT) blocks of X^T
  Workspace<acc_t> hbuf;      // kStream: (n, I) rows; kTiles: (I x kTileT) blocks of H^T
  Workspace<T> hlow;          // kStream with the bf16 dot products: h rows in T (x is read in place)
  Workspace<T> xpack, hpack;  // kBf16Tiles: the expert's X and h, packed (bf16_tiles.h)
  bool bf16dp = false;
  acc_t* ypair = nullptr;     // (T k, H): routing weight x expert output, per pair

  acc_t weight(int64_t p) const { return wf ? static_cast<acc_t>(wf[p]) : static_cast<acc_t>(wt[p]); }
  int64_t count(int64_t e) const { return r.offsets[e + 1] - r.offsets[e]; }
  int64_t token(int64_t s) const { return r.order[s] / r.top_k; }
};

// Gate/up results of features [j0, j0 + rows) for n_tok tokens at sorted positions s0..: element
// (t, i) at t * t_stride + i * f_stride. Writes h = act(g) u to h (same layout) and g, u to the
// cache rows of the pairs (when saving for the backward).
template <typename T, typename acc_t>
void up_epilogue(ForwardCtx<T>& c, int64_t s0, int64_t n_tok, int64_t j0, int64_t rows, const acc_t* gv,
                 const acc_t* uv, acc_t* h, int64_t t_stride, int64_t f_stride) {
  const int64_t I = c.g.inter;
  if (f_stride == 1) {
    for (int64_t t = 0; t < n_tok; ++t) act_mul<acc_t>(gv + t * t_stride, uv + t * t_stride, h + t * t_stride, rows, c.act);
  } else {
    for (int64_t i = 0; i < rows; ++i) act_mul<acc_t>(gv + i * f_stride, uv + i * f_stride, h + i * f_stride, n_tok, c.act);
  }
  if (!c.cache) return;
  for (int64_t t = 0; t < n_tok; ++t) {
    T* cache_row = c.cache + c.r.order[s0 + t] * 2 * I;
    for (int64_t i = 0; i < rows; ++i) {
      cache_row[j0 + i] = static_cast<T>(gv[t * t_stride + i * f_stride]);
      cache_row[I + j0 + i] = static_cast<T>(uv[t * t_stride + i * f_stride]);
    }
  }
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

// The weight rows [r0, r1) of a (rows x K) matrix as fp32: in place for fp32, else widened into
// buf (one task's row block, 32 x K: L2-sized).
template <typename T>
const float* rows_fp32(const T* w, int64_t K, int64_t r0, int64_t r1, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return w + r0 * K;
  } else {
    buf.resize((r1 - r0) * K);
    cpu::convert_n(w + r0 * K, buf.data(), (r1 - r0) * K);
    return buf.data();
  }
}

// GEMM tiles (fp32 brgemm; bf16/fp16 weights widened per task where the CPU has no native
// low-precision GEMM): X^T blocks of kTileT tokens were packed into xbuf (H x kTileT each).
template <typename T>
void gemm_up_task(ForwardCtx<T>& c, int64_t e, int64_t j0, int64_t j1) {
  const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
  const T* w = c.w1 + e * 2 * I * H;
  const int64_t rows = j1 - j0;
  thread_local std::vector<float> gbuf, ubuf;
  const float* wg = rows_fp32(w, H, j0, j1, gbuf);
  const float* wu = rows_fp32(w, H, I + j0, I + j1, ubuf);
  alignas(64) float cg[kTileN * kTileT], cu[kTileN * kTileT];
  for (int64_t tb = 0; tb * kTileT < n; ++tb) {
    const int64_t nt = std::min<int64_t>(kTileT, n - tb * kTileT);
    const float* xt = c.xbuf.data() + c.xoff[e] + tb * H * kTileT;
    tile_gemm(rows, nt, H, H, wg, xt, cg);
    tile_gemm(rows, nt, H, H, wu, xt, cu);
    // C tiles are (features x tokens), as is the h^T block of this token tile (I x kTileT)
    float* ht = c.hbuf.data() + c.hoff[e] + tb * I * kTileT + j0 * kTileT;
    up_epilogue<T, float>(c, s0 + tb * kTileT, nt, j0, rows, cg, cu, ht, 1, kTileT);
    if constexpr (!std::is_same_v<T, float>) {
      // h rounded to the input dtype before the down projection, as the eager bf16/fp16 loop has it
      for (int64_t i = 0; i < rows * kTileT; ++i) ht[i] = static_cast<float>(static_cast<T>(ht[i]));
    }
  }
}

template <typename T>
void gemm_down_task(ForwardCtx<T>& c, int64_t e, int64_t h0, int64_t h1) {
  const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
  const int64_t rows = h1 - h0;
  thread_local std::vector<float> wbuf;
  const float* w = rows_fp32(c.w2 + e * H * I, I, h0, h1, wbuf);
  alignas(64) float cy[kTileN * kTileT];
  for (int64_t tb = 0; tb * kTileT < n; ++tb) {
    const int64_t nt = std::min<int64_t>(kTileT, n - tb * kTileT);
    const float* ht = c.hbuf.data() + c.hoff[e] + tb * I * kTileT;
    tile_gemm(rows, nt, I, I, w, ht, cy);
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t p = c.r.order[s0 + tb * kTileT + t];
      const float wp = c.weight(p);
      float* y = c.ypair + p * H + h0;
      for (int64_t i = 0; i < rows; ++i) y[i] = wp * cy[i * kTileT + t];
    }
  }
}

// bf16 tiles (bf16_tiles.h): X packed per expert in phase 0, h packed by the up tasks for the down
// projection. C blocks are (features x padded tokens).
template <typename T>
void bf16_pack_task(ForwardCtx<T>& c, int64_t e, int64_t panel) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t H = c.g.hidden, n = c.count(e), s0 = c.r.offsets[e], t0 = panel * bf16_tiles::kPanel;
    const int64_t cnt = std::min(bf16_tiles::kPanel, n - t0);
    const T* rows[bf16_tiles::kPanel];
    for (int64_t t = 0; t < cnt; ++t) rows[t] = c.x + c.token(s0 + t0 + t) * H;
    bf16_tiles::pack_panel(rows, cnt, bf16_tiles::panel_width(n, panel), H,
                           c.xpack.data() + c.xoff[e] + bf16_tiles::panel_offset(panel, H));
  }
}

template <typename T>
// (next_e, next_j0): the task to prefetch the first rows of (next_e -1: none)
void bf16_up_task(ForwardCtx<T>& c, int64_t e, int64_t j0, int64_t j1, int64_t next_e, int64_t next_j0) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
    const int64_t rows = j1 - j0, ld = bf16_tiles::padded(n);
    const T* w = c.w1 + e * 2 * I * H;
    const T* xp = c.xpack.data() + c.xoff[e];
    T* hp = c.hpack.data() + c.hoff[e];
    if (!c.cache) {  // nothing to save: the activation runs in registers, h goes straight to hpack
      const T* nw = next_e >= 0 ? c.w1 + next_e * 2 * I * H : nullptr;
      bf16_tiles::gemm_glu(w + j0 * H, w + (I + j0) * H, H, rows, H, xp, n, c.act, hp, I, j0,
                           nw ? nw + next_j0 * H : nullptr, nw ? nw + (I + next_j0) * H : nullptr);
      return;
    }
    thread_local std::vector<float> cg, cu, hv;
    cg.resize(rows * ld);
    cu.resize(rows * ld);
    hv.resize(rows * ld);
    bf16_tiles::gemm(w + j0 * H, H, rows, H, xp, n, cg.data(), ld);
    bf16_tiles::gemm(w + (I + j0) * H, H, rows, H, xp, n, cu.data(), ld);
    up_epilogue<T, float>(c, s0, n, j0, rows, cg.data(), cu.data(), hv.data(), 1, ld);
    // h rounded to bf16 (as the eager bf16 loop has it), packed by feature pairs; j0 is even
    for (int64_t i = 0; i < rows; i += 2) {
      const float* second = i + 1 < rows ? hv.data() + (i + 1) * ld : nullptr;
      bf16_tiles::pack_feature_pair(hv.data() + i * ld, second, n, I, j0 + i, hp);
    }
  }
}

template <typename T>
void bf16_down_task(ForwardCtx<T>& c, int64_t e, int64_t h0, int64_t h1, int64_t next_e, int64_t next_h0) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
    const int64_t rows = h1 - h0, ld = bf16_tiles::padded(n);
    thread_local std::vector<float> cy;
    cy.resize(rows * ld);
    bf16_tiles::gemm(c.w2 + e * H * I + h0 * I, I, rows, I, c.hpack.data() + c.hoff[e], n, cy.data(), ld,
                     next_e >= 0 ? c.w2 + next_e * H * I + next_h0 * I : nullptr);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = c.r.order[s0 + t];
      const float wp = c.weight(p);
      float* y = c.ypair + p * H + h0;
      for (int64_t i = 0; i < rows; ++i) y[i] = wp * cy[i * ld + t];
    }
  }
}

// bf16/fp16 experts with many tokens: ATen matmul (oneDNN) per expert, run one after another
// (each GEMM is itself parallel), the activation and the weighted scatter fused here.
template <typename T>
void aten_expert(ForwardCtx<T>& c, int64_t e, const at::Tensor& hidden, const at::Tensor& w1, const at::Tensor& w2) {
  using acc_t = typename ForwardCtx<T>::acc_t;
  const int64_t H = c.g.hidden, I = c.g.inter, n = c.count(e), s0 = c.r.offsets[e];
  std::vector<int64_t> tok(n);
  for (int64_t i = 0; i < n; ++i) tok[i] = c.token(s0 + i);
  const at::Tensor idx = at::from_blob(tok.data(), {n}, at::kLong);
  const at::Tensor xe = hidden.index_select(0, idx);
  const at::Tensor gu = at::mm(xe, w1[e].t());  // (n, 2I)
  at::Tensor he = at::empty({n, I}, hidden.options());
  const T* gup = gu.const_data_ptr<T>();
  T* hp = he.mutable_data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t end) {
    std::vector<acc_t> buf(3 * I);
    for (int64_t i = b; i < end; ++i) {
      const T* row = gup + i * 2 * I;
      if (c.cache) std::copy(row, row + 2 * I, c.cache + c.r.order[s0 + i] * 2 * I);
      cpu::convert_n(row, buf.data(), 2 * I);
      act_mul<acc_t>(buf.data(), buf.data() + I, buf.data() + 2 * I, I, c.act);
      cpu::convert_n(buf.data() + 2 * I, hp + i * I, I);
    }
  });
  const at::Tensor ye = at::mm(he, w2[e].t());  // (n, H)
  const T* yp = ye.const_data_ptr<T>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const int64_t p = c.r.order[s0 + i];
      acc_t* y = c.ypair + p * H;
      cpu::convert_n(yp + i * H, y, H);
      scale_n<acc_t>(y, c.weight(p), y, H);
    }
  });
}

// How bf16/fp16 experts with many tokens multiply.
//  - kBf16Tiles: accel's bf16 tiles (bf16_tiles.h) on CPUs with AVX512-BF16 but no AMX: about 1.2x
//    oneDNN's bf16 GEMM at Mixtral's shapes, which packs the weights on every call.
//  - kAten: oneDNN's GEMM in that dtype where it runs on AMX (bf16) or AVX512-FP16 (fp16).
//  - kWiden: the fp32 tiles on weights widened per task, everywhere else: without native support
//    oneDNN's bf16 GEMM takes a slow path (the Mixtral T 512 bf16 forward measured 1.0 s on an
//    AVX2-only CPU against 0.24 s for fp32).
// ACCEL_MOE_LOWP_GEMM=tiles / aten / widen forces one (tiles only where the CPU has AVX512-BF16,
// and for bf16).
enum class LowpGemm { kBf16Tiles, kAten, kWiden };

template <typename T>
LowpGemm lowp_gemm() {
  static const LowpGemm path = [] {
    constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
    const bool tiles_ok = kBf16 && cpu::cpu_has_avx512_bf16();
    const char* force = std::getenv("ACCEL_MOE_LOWP_GEMM");
    const std::string f = force ? force : "";
    if (f == "aten") return LowpGemm::kAten;
    if (f == "widen") return LowpGemm::kWiden;
    if (f == "tiles" && tiles_ok) return LowpGemm::kBf16Tiles;
#ifdef ACCEL_HAVE_AVX512_TARGET
    if (kBf16 && cpu::cpu_has_amx_bf16()) return LowpGemm::kAten;
    if (tiles_ok) return LowpGemm::kBf16Tiles;
    if (!kBf16 && cpu::cpu_has_avx512_fp16()) return LowpGemm::kAten;
    return LowpGemm::kWiden;
#else
    return LowpGemm::kAten;
#endif
  }();
  return path;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& hidden, const at::Tensor& w1,
                                                const at::Tensor& w2, const at::Tensor& weights,
                                                const Routing& r, const Geometry& g, Activation act,
                                                bool save_cache) {
  using acc_t = at::opmath_type<T>;
  const int64_t H = g.hidden, I = g.inter, E = g.experts, P = r.pairs;
  at::Tensor out = at::empty({g.tokens, H}, hidden.options());
  at::Tensor cache = at::empty({save_cache ? P : 0, 2 * I}, hidden.options());
  if (g.tokens == 0) return {out, cache};
  if (I == 0) {
    out.zero_();
    return {out, cache};
  }

  ForwardCtx<T> c{g, r, act, hidden.const_data_ptr<T>(), w1.const_data_ptr<T>(), w2.const_data_ptr<T>()};
  if (weights.scalar_type() == at::kFloat) {
    c.wf = weights.const_data_ptr<float>();
  } else {
    c.wt = weights.const_data_ptr<T>();
  }
  c.cache = save_cache ? cache.mutable_data_ptr<T>() : nullptr;
  Workspace<acc_t> ypair;  // every pair's row is written by its expert's down tasks
  ypair.resize(P * H);
  c.ypair = ypair.data();

  // per expert: path and buffer offsets
  constexpr bool kLowp = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
  constexpr bool kGemm = std::is_same_v<T, float> || kLowp;  // experts with many tokens run GEMMs
  const LowpGemm lowp = kLowp ? lowp_gemm<T>() : LowpGemm::kWiden;
  const Path many = !kLowp ? Path::kTiles
                    : lowp == LowpGemm::kAten ? Path::kAten
                    : lowp == LowpGemm::kBf16Tiles ? Path::kBf16Tiles
                                                   : Path::kTiles;
  const int64_t smax = stream_max_tokens();
  c.bf16dp = use_bf16dp<T>();
  c.path.assign(E, Path::kNone);
  c.xoff.assign(E, 0);
  c.hoff.assign(E, 0);
  int64_t xsize = 0, hsize = 0, lsize = 0, xpsize = 0, hpsize = 0;
  std::vector<int64_t> aten_experts;
  bool any_tiles = false;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = c.count(e);
    if (n == 0) continue;
    const Path path = kGemm && n > smax ? many : Path::kStream;
    c.path[e] = path;
    if (path == Path::kStream && c.bf16dp) {  // x read in place, h kept in T
      c.hoff[e] = lsize;
      lsize += n * I;
    } else if (path == Path::kStream || path == Path::kTiles) {
      const int64_t cap = path == Path::kTiles ? (n + kTileT - 1) / kTileT * kTileT : n;
      c.xoff[e] = xsize;
      c.hoff[e] = hsize;
      xsize += cap * H;
      hsize += cap * I;
      any_tiles |= path == Path::kTiles;
    } else if (path == Path::kBf16Tiles) {
      c.xoff[e] = xpsize;
      c.hoff[e] = hpsize;
      xpsize += bf16_tiles::packed_size(n, H);
      hpsize += bf16_tiles::packed_size(n, I);
    } else {
      aten_experts.push_back(e);
    }
  }
  c.xbuf.resize(xsize);
  c.hbuf.resize(hsize);
  c.hlow.resize(lsize);
  c.xpack.resize(xpsize);
  c.hpack.resize(hpsize);

  // phase 0: gather the tokens: widened rows for streaming (unless x is read in place), X^T blocks
  // for the fp32 tiles, packed panels for the bf16 tiles
  struct Task {
    int64_t e, a, b;
  };
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = c.count(e);
    switch (c.path[e]) {
      case Path::kTiles:
        for (int64_t tb = 0; tb * kTileT < n; ++tb) tasks.push_back({e, tb, 0});
        break;
      case Path::kBf16Tiles:
        for (int64_t p = 0; p < bf16_tiles::panels(n); ++p) tasks.push_back({e, p, 0});
        break;
      case Path::kStream:
        if (!c.bf16dp) tasks.push_back({e, 0, n});
        break;
      default:
        break;
    }
  }
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int64_t) {
    const Task& t = tasks[i];
    const int64_t s0 = r.offsets[t.e];
    if (c.path[t.e] == Path::kBf16Tiles) {
      bf16_pack_task<T>(c, t.e, t.a);
    } else if (c.path[t.e] == Path::kTiles) {
      const int64_t n = c.count(t.e), m0 = t.a * kTileT, nt = std::min<int64_t>(kTileT, n - m0);
      acc_t* xt = c.xbuf.data() + c.xoff[t.e] + t.a * H * kTileT;
      for (int64_t m = 0; m < nt; ++m) {
        const T* xr = c.x + c.token(s0 + m0 + m) * H;
        for (int64_t k = 0; k < H; ++k) xt[k * kTileT + m] = static_cast<acc_t>(xr[k]);
      }
    } else {
      for (int64_t m = t.a; m < t.b; ++m) {
        const T* xr = c.x + c.token(s0 + m) * H;
        acc_t* dst = c.xbuf.data() + c.xoff[t.e] + m * H;
        for (int64_t k = 0; k < H; ++k) dst[k] = static_cast<acc_t>(xr[k]);
      }
    }
  });

  // phase 1: up projections; phase 2: down projections (features split into tasks of 32)
  static_assert(kTileN == kStreamRows, "one feature split for both paths");
  auto make_tasks = [&](int64_t features) {
    tasks.clear();
    for (int64_t e = 0; e < E; ++e) {
      if (c.path[e] == Path::kNone || c.path[e] == Path::kAten) continue;
      for (int64_t f = 0; f < features; f += kTileN) tasks.push_back({e, f, std::min(features, f + kTileN)});
    }
  };
  auto run_phase = [&](bool up) {
    parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i, int64_t guess) {
      const Task& t = tasks[i];
      switch (c.path[t.e]) {
        case Path::kBf16Tiles: {
          // the likely next task's first weight rows are fetched while this task's last block runs
          const bool pf = guess >= 0 && guess < static_cast<int64_t>(tasks.size()) &&
                          c.path[tasks[guess].e] == Path::kBf16Tiles;
          const int64_t pe = pf ? tasks[guess].e : -1, pa = pf ? tasks[guess].a : 0;
          up ? bf16_up_task<T>(c, t.e, t.a, t.b, pe, pa) : bf16_down_task<T>(c, t.e, t.a, t.b, pe, pa);
          break;
        }
        case Path::kTiles:
          if constexpr (kGemm) up ? gemm_up_task<T>(c, t.e, t.a, t.b) : gemm_down_task<T>(c, t.e, t.a, t.b);
          break;
        default:
          up ? stream_up_task<T>(c, t.e, t.a, t.b) : stream_down_task<T>(c, t.e, t.a, t.b);
      }
    });
    if (any_tiles) {
      at::parallel_for(0, at::get_num_threads(), 1, [](int64_t, int64_t) {
        at::native::cpublas::brgemm_release(false);
      });
    }
  };
  make_tasks(I);
  run_phase(true);
  make_tasks(H);
  run_phase(false);
  for (const int64_t e : aten_experts) aten_expert<T>(c, e, hidden, w1, w2);

  // phase 3: combine each token's k rows, in slot order
  T* o = out.mutable_data_ptr<T>();
  const int64_t K = r.top_k;
  at::parallel_for(0, g.tokens, 1, [&](int64_t b, int64_t end) {
    std::vector<acc_t> row(H);
    for (int64_t t = b; t < end; ++t) {
      acc_t* y = c.ypair + t * K * H;
      for (int64_t j = 1; j < K; ++j) {
        const acc_t* yj = y + j * H;
        int64_t h = 0;
        if constexpr (std::is_same_v<acc_t, float>) {
          for (; h + kV <= H; h += kV) (Vec::loadu(y + h) + Vec::loadu(yj + h)).store(y + h);
        }
        for (; h < H; ++h) y[h] += yj[h];
      }
      cpu::convert_n(y, o + t * H, H);
    }
  });
  return {out, cache};
}

std::tuple<at::Tensor, at::Tensor> fused_moe_fwd_cpu(const at::Tensor& hidden_, const at::Tensor& w1_,
                                                     const at::Tensor& w2_, const at::Tensor& weights_,
                                                     const at::Tensor& ids, c10::string_view activation,
                                                     bool save_cache) {
  const Geometry g = check_forward(hidden_, w1_, w2_, weights_, ids);
  const Activation act = parse_activation(std::string(activation), kOp);
  const Routing r = make_routing(ids, g.experts);
  const at::Tensor hidden = hidden_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const at::Tensor weights = weights_.contiguous();
  std::tuple<at::Tensor, at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "fused_moe_fwd_cpu", [&] {
    res = forward_impl<scalar_t>(hidden, w1, w2, weights, r, g, act, save_cache);
  });
  return res;
}

// ------------------------------------------------------------------ backward

// act(g) and act'(g) of one vector; SiLU shares its sigmoid between the two.
template <typename acc_t>
inline void act_and_grad(const Vectorized<acc_t>& g, Activation act, Vectorized<acc_t>& a, Vectorized<acc_t>& da) {
  using V = Vectorized<acc_t>;
  if (act == Activation::Silu) {
    const V one(acc_t(1));
    const V s = one / (one + cpu::exp_fast(g.neg()));
    a = g * s;
    da = s * (one + g * (one - s));
  } else {
    a = cpu::activation_vec(g, act);
    da = cpu::activation_grad_vec(g, act);
  }
}

// The backward's elementwise part for the n pairs of one expert, row r being pair pair[r] of token
// pair[r] / top_k. From the saved gate and up values and z = dout W2 (before the routing weight w):
//   h = act(g) u,  d w = z . h,  dh = w z,  dgate = dh u act'(g),  dup = dh act(g),
// rounded to T for the GEMMs that follow: dgu (n, 2I) = [dgate | dup], hs (n, I) = h and
// gw (n, H) = w dout (each output only when its pointer is set; z only when dgu or dwt is).
template <typename T>
void backward_rows(const T* cache, const int64_t* pair, int64_t top_k, int64_t n, int64_t I, int64_t H,
                   const T* z, const T* grad_out, const at::opmath_type<T>* wflat, Activation act, T* dgu, T* hs,
                   T* gw, at::opmath_type<T>* dwt) {
  using acc_t = at::opmath_type<T>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(4 * I + H);
    acc_t *g = buf.data(), *u = g + I, *zf = u + I, *hf = zf + I, *gof = hf + I;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p = pair[r];
      const acc_t w = wflat[p];
      cpu::convert_n(cache + p * 2 * I, g, I);
      cpu::convert_n(cache + p * 2 * I + I, u, I);
      if (z) cpu::convert_n(z + r * I, zf, I);
      const V wv(w);
      V dsum(acc_t(0));
      int64_t i = 0;
      for (; i + W <= I; i += W) {
        const V gv = V::loadu(g + i), uv = V::loadu(u + i);
        V a, da;
        act_and_grad<acc_t>(gv, act, a, da);
        const V h = a * uv;
        h.store(hf + i);
        if (z) {
          const V zv = V::loadu(zf + i);
          dsum = at::vec::fmadd(zv, h, dsum);
          const V dh = wv * zv;
          (dh * uv * da).store(g + i);  // dgate over g, dup over u: both were read above
          (dh * a).store(u + i);
        }
      }
      acc_t dot = at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return x + y; }, dsum);
      for (; i < I; ++i) {
        const acc_t a = activation_forward<acc_t>(g[i], act), da = activation_grad<acc_t>(g[i], act);
        const acc_t h = a * u[i];
        hf[i] = h;
        if (z) {
          dot += zf[i] * h;
          const acc_t dh = w * zf[i];
          g[i] = dh * u[i] * da;
          u[i] = dh * a;
        }
      }
      if (dwt) dwt[p] = dot;
      if (dgu) {
        cpu::convert_n(g, dgu + r * 2 * I, I);
        cpu::convert_n(u, dgu + r * 2 * I + I, I);
      }
      if (hs) cpu::convert_n(hf, hs + r * I, I);
      if (gw) {
        cpu::convert_n(grad_out + (p / top_k) * H, gof, H);
        scale_n<acc_t>(gof, w, gof, H);
        cpu::convert_n(gof, gw + r * H, H);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& hidden_, const at::Tensor& w1_, const at::Tensor& w2_,
    const at::Tensor& weights_, const at::Tensor& ids, const at::Tensor& cache_, c10::string_view activation,
    std::array<bool, 4> mask) {
  const Geometry g = check_backward(grad_out_, hidden_, w1_, w2_, weights_, ids, cache_);
  const Activation act = parse_activation(std::string(activation), kOp);
  const Routing r = make_routing(ids, g.experts);
  const at::Tensor grad_out = grad_out_.contiguous(), hidden = hidden_.contiguous();
  const at::Tensor w1 = w1_.contiguous(), w2 = w2_.contiguous(), weights = weights_.contiguous();
  const at::Tensor cache = cache_.contiguous();
  const int64_t H = g.hidden, I = g.inter, E = g.experts;
  const auto opts = hidden.options();
  const at::ScalarType acc_type = at::toOpMathType(hidden.scalar_type());

  // The weight gradients are written once, expert by expert (a GEMM straight into a routed
  // expert's slice, zeros into the others), into buffers from accel's CPU block cache: a fresh
  // 100+ MB tensor would fault its pages in on every call, which cost more than the GEMMs of a
  // decode-sized backward.
  at::Tensor dx_acc = mask[0] ? at::zeros({g.tokens, H}, opts.dtype(acc_type)) : at::Tensor();
  at::Tensor dw1 = mask[1] ? empty_for_streaming(w1.sizes(), opts) : at::empty({0}, opts);
  at::Tensor dw2 = mask[2] ? empty_for_streaming(w2.sizes(), opts) : at::empty({0}, opts);
  at::Tensor dwt_acc = mask[3] ? at::zeros({r.pairs}, opts.dtype(acc_type)) : at::Tensor();
  const at::Tensor wflat = weights.reshape({-1}).to(acc_type);  // weights is contiguous, so is wflat
  const bool need_dgu = mask[0] || mask[1], need_z = need_dgu || mask[3];

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "fused_moe_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = r.offsets[e], n = r.offsets[e + 1] - s0;
      if (n == 0) {
        if (mask[1]) dw1[e].zero_();
        if (mask[2]) dw2[e].zero_();
        continue;
      }
      std::vector<int64_t> pair(r.order.begin() + s0, r.order.begin() + s0 + n), tok(n);
      for (int64_t i = 0; i < n; ++i) tok[i] = pair[i] / r.top_k;
      const at::Tensor tidx = at::from_blob(tok.data(), {n}, at::kLong);  // tok outlives the iteration
      const at::Tensor z = need_z ? at::mm(grad_out.index_select(0, tidx), w2[e]) : at::Tensor();  // (n, I)
      const at::Tensor dgu = need_dgu ? at::empty({n, 2 * I}, opts) : at::Tensor();
      const at::Tensor hs = mask[2] ? at::empty({n, I}, opts) : at::Tensor();
      const at::Tensor gw = mask[2] ? at::empty({n, H}, opts) : at::Tensor();
      backward_rows<scalar_t>(cache.const_data_ptr<scalar_t>(), pair.data(), r.top_k, n, I, H,
                              need_z ? z.const_data_ptr<scalar_t>() : nullptr, grad_out.const_data_ptr<scalar_t>(),
                              wflat.const_data_ptr<acc_t>(), act,
                              need_dgu ? dgu.mutable_data_ptr<scalar_t>() : nullptr,
                              mask[2] ? hs.mutable_data_ptr<scalar_t>() : nullptr,
                              mask[2] ? gw.mutable_data_ptr<scalar_t>() : nullptr,
                              mask[3] ? dwt_acc.mutable_data_ptr<acc_t>() : nullptr);
      if (mask[2]) {
        at::Tensor dst = dw2[e];
        at::mm_out(dst, gw.t(), hs);
      }
      if (mask[1]) {
        at::Tensor dst = dw1[e];
        at::mm_out(dst, dgu.t(), hidden.index_select(0, tidx));
      }
      if (mask[0]) dx_acc.index_add_(0, tidx, at::mm(dgu, w1[e]).to(acc_type));
    }
  });
  at::Tensor dx = mask[0] ? dx_acc.to(hidden.scalar_type()) : at::empty({0}, opts);
  at::Tensor dwt = mask[3] ? dwt_acc.view(weights.sizes()).to(weights.scalar_type())
                           : at::empty({0}, weights.options());
  return {dx, dw1, dw2, dwt};
}

// ------------------------------------------------------------------ routing

// The k largest scores of one token, in descending order (ties: the lower expert id first; a NaN
// score never wins over a number, and every slot is filled as E >= k).
template <typename acc_t>
void select_top_k(const acc_t* s, int64_t E, int64_t k, int64_t* ids) {
  for (int64_t j = 0; j < k; ++j) ids[j] = -1;
  for (int64_t e = 0; e < E; ++e) {
    int64_t pos = k;
    while (pos > 0 && (ids[pos - 1] < 0 || s[e] > s[ids[pos - 1]])) --pos;
    if (pos >= k) continue;
    for (int64_t j = k - 1; j > pos; --j) ids[j] = ids[j - 1];
    ids[pos] = e;
  }
}

// Scores in acc_t (float32, or float64 for float64 logits): softmax over the experts or sigmoid.
template <typename T, typename acc_t>
void scores_of(const T* l, int64_t E, Scoring scoring, acc_t* s) {
  if (scoring == Scoring::Softmax) {
    acc_t m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<acc_t>(l[e]));
    acc_t sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(static_cast<acc_t>(l[e]) - m));
    for (int64_t e = 0; e < E; ++e) s[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(l[e])));
  }
}

template <typename T, typename acc_t>
void route_impl(const T* logits, int64_t tokens, int64_t E, int64_t k, bool renorm, Scoring scoring, acc_t* w,
                int64_t* ids) {
  at::parallel_for(0, tokens, 16, [&](int64_t b, int64_t end) {
    std::vector<acc_t> s(E);
    for (int64_t t = b; t < end; ++t) {
      scores_of<T, acc_t>(logits + t * E, E, scoring, s.data());
      int64_t* id = ids + t * k;
      select_top_k<acc_t>(s.data(), E, k, id);
      acc_t* wt = w + t * k;
      acc_t tot = 0;
      for (int64_t j = 0; j < k; ++j) tot += (wt[j] = s[id[j]]);
      if (renorm) {
        for (int64_t j = 0; j < k; ++j) wt[j] /= tot;
      }
    }
  });
}

// Routing weights are float32 (as transformers' routers give them), float64 for float64 logits.
at::ScalarType route_weight_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits_, int64_t top_k, bool renormalize,
                                                 c10::string_view scoring) {
  check_route(logits_, top_k);
  const Scoring sc = parse_scoring(std::string(scoring));
  const at::Tensor logits = logits_.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor w = at::empty({T, top_k}, logits.options().dtype(route_weight_type(logits)));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_route_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    route_impl<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), T, E, top_k, renormalize, sc,
                                w.mutable_data_ptr<acc_t>(), ids.mutable_data_ptr<int64_t>());
  });
  return {w, ids};
}

template <typename acc_t>
void route_backward_impl(const acc_t* gp, const acc_t* lp, const int64_t* ip, int64_t T, int64_t E, int64_t k,
                         bool renormalize, Scoring sc, acc_t* out) {
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t end) {
    std::vector<acc_t> p(E);
    for (int64_t t = b; t < end; ++t) {
      const acc_t* g = gp + t * k;
      const int64_t* id = ip + t * k;
      acc_t* d = out + t * E;
      if (sc == Scoring::Softmax) {
        scores_of<acc_t, acc_t>(lp + t * E, E, sc, p.data());
        if (renormalize) {  // w_j = softmax over the kept logits
          acc_t kept = 0, dot = 0;
          for (int64_t j = 0; j < k; ++j) kept += p[id[j]];
          for (int64_t j = 0; j < k; ++j) dot += (p[id[j]] / kept) * g[j];
          for (int64_t j = 0; j < k; ++j) d[id[j]] += (p[id[j]] / kept) * (g[j] - dot);
        } else {  // w_j = p_j of the full softmax
          acc_t dot = 0;
          for (int64_t j = 0; j < k; ++j) dot += p[id[j]] * g[j];
          for (int64_t e = 0; e < E; ++e) d[e] = -p[e] * dot;
          for (int64_t j = 0; j < k; ++j) d[id[j]] += p[id[j]] * g[j];
        }
      } else {
        for (int64_t j = 0; j < k; ++j) p[j] = acc_t(1) / (acc_t(1) + std::exp(-lp[t * E + id[j]]));
        if (renormalize) {  // w_j = p_j / sum_kept p
          acc_t kept = 0, dot = 0;
          for (int64_t j = 0; j < k; ++j) kept += p[j];
          for (int64_t j = 0; j < k; ++j) dot += (p[j] / kept) * g[j];
          for (int64_t j = 0; j < k; ++j) d[id[j]] += (g[j] - dot) / kept * p[j] * (acc_t(1) - p[j]);
        } else {
          for (int64_t j = 0; j < k; ++j) d[id[j]] += g[j] * p[j] * (acc_t(1) - p[j]);
        }
      }
    }
  });
}

at::Tensor moe_route_backward_cpu(const at::Tensor& grad_w, const at::Tensor& logits, const at::Tensor& w,
                                  const at::Tensor& ids_, bool renormalize, c10::string_view scoring) {
  check_dim(kRouteOp, "topk_ids", ids_, 2, "(T, k)");
  check_route(logits, ids_.size(1));
  const Scoring sc = parse_scoring(std::string(scoring));
  const int64_t T = logits.size(0), E = logits.size(1), k = ids_.size(1);
  TORCH_CHECK(ids_.size(0) == T && grad_w.sizes() == ids_.sizes() && w.sizes() == ids_.sizes(), kRouteOp,
              ": grad_weights, topk_weights and topk_ids must all be (T, k) = (", T, ", ", k, ")");
  const at::Tensor ids = ids_.to(at::kLong).contiguous();
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < E, kRouteOp, ": topk_ids must be in [0, E) = [0, ", E, "), found ", lo < 0 ? lo : hi);
  }
  const at::ScalarType acc = route_weight_type(logits);
  const at::Tensor gw = grad_w.to(acc).contiguous(), lg = logits.to(acc).contiguous();
  at::Tensor grad = at::zeros({T, E}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "moe_route_backward_cpu", [&] {
    route_backward_impl<scalar_t>(gw.const_data_ptr<scalar_t>(), lg.const_data_ptr<scalar_t>(),
                                  ids.const_data_ptr<int64_t>(), T, E, k, renormalize, sc,
                                  grad.mutable_data_ptr<scalar_t>());
  });
  return grad.to(logits.scalar_type());
}

}  // namespace
}  // namespace accel::fused_moe

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("moe_route", &accel::fused_moe::moe_route_cpu);
  m.impl("moe_route_backward", &accel::fused_moe::moe_route_backward_cpu);
  m.impl("fused_moe_fwd", &accel::fused_moe::fused_moe_fwd_cpu);
  m.impl("fused_moe_bwd", &accel::fused_moe::fused_moe_bwd_cpu);
}
