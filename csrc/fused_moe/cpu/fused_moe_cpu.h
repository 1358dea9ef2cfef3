// Internal declarations shared by the fused MoE CPU kernels:
//   routing.cpp   moe_route and its backward; the routing tables (pairs sorted by expert)
//   forward.cpp   the forward's phases and its GEMM tasks (experts with many tokens)
//   decode.cpp    the streaming tasks (experts with few tokens: dot products of weight rows)
//   backward.cpp  the backward
//
// Forward, after a counting sort of the T k (token, slot) pairs by expert:
//   phase 1 (up):   for every active expert, gate and up rows of W1 against its tokens, then
//                   h = act(g) u                                  -> H buffer (fp32)
//   phase 2 (down): W2 rows against h, times the routing weight     -> one fp32 row per pair
//   phase 3:        out[t] = sum of the token's k pair rows (each token reduced by one thread:
//                   no atomics, a fixed order, so results are deterministic)
// Each phase is one parallel region over a task list in memory order (common/parallel.h),
// whatever the number of experts, so a decode step pays three parallel regions and no
// per-expert overhead.
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
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "common/activation.h"
#include "common/cpu_memory.h"
#include "common/cpu_vec.h"
#include "fused_moe/fused_moe.h"

namespace accel::fused_moe::moe_cpu {

using at::vec::Vectorized;
using Vec = Vectorized<float>;
constexpr int64_t kV = Vec::size();

constexpr int64_t kStreamMaxTokens = 8;  // experts with at most this many tokens stream their weights
constexpr int64_t kStreamRows = 32;      // weight rows per streaming task
constexpr int64_t kTileN = 32;           // output features per GEMM tile (A rows)
constexpr int64_t kTileT = 64;           // tokens per GEMM tile (B columns)

// ------------------------------------------------------------------ routing tables

struct Routing {
  int64_t tokens = 0, top_k = 0, experts = 0, pairs = 0;
  std::vector<int64_t> offsets;  // experts + 1: segment of expert e in sorted order
  std::vector<int64_t> order;    // sorted position -> pair index p = t * k + j
};

// The pairs of topk_ids (T, k) sorted by expert; checks every id is in [0, experts).
Routing make_routing(const at::Tensor& topk_ids, int64_t experts);

// ------------------------------------------------------------------ vector helpers

// h[i] = act(g[i]) * u[i]
template <typename acc_t>
inline void act_mul(const acc_t* g, const acc_t* u, acc_t* h, int64_t n, Activation a) {
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; i + kV <= n; i += kV) {
      (cpu::activation_vec<float>(Vec::loadu(g + i), a) * Vec::loadu(u + i)).store(h + i);
    }
  }
  for (; i < n; ++i) h[i] = activation_forward<acc_t>(g[i], a) * u[i];
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

// Streaming tasks (decode.cpp): the gate and up rows [j0, j1) of expert e's W1 against its
// tokens, h into the expert's H rows; the down rows [h0, h1) of W2 against h, times the routing
// weight, into the pairs' rows.
template <typename T>
void stream_up_task(ForwardCtx<T>& c, int64_t e, int64_t j0, int64_t j1);
template <typename T>
void stream_down_task(ForwardCtx<T>& c, int64_t e, int64_t h0, int64_t h1);

// Whether the streaming tasks of a call take the AVX512-BF16 dot products (bf16 inputs only).
template <typename T>
bool use_bf16dp();

}  // namespace accel::fused_moe::moe_cpu
