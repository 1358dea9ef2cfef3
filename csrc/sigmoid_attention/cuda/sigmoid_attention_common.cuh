// Device helpers of the sigmoid-attention CUDA kernels: sequence geometry, masks, biases, the
// sigmoid in base 2, and the shared-memory tile copies of the tensor-core kernels. Included by the
// forward and backward kernel headers and by the fp32 kernels.
//
// Shared tiles are row major with a pitch of D + 8 elements (16 bytes times an odd number), so the
// 8 row addresses of an ldmatrix matrix hit 8 different 16-byte bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/cuda_mma.cuh"
#include "common/cuda_portable.h"
#include "sigmoid_attention/cuda/sigmoid_attention_cuda.h"

namespace accel::sigmoid_attention::cuda {
namespace detail {

using namespace ::accel::cuda_mma;

// ------------------------------------------------------------------ problem geometry and maths

struct SeqInfo {
  int64_t q_row0, k_row0;  // first packed row of the sequence (0 in dense mode)
  int len_q, len_k;        // len_k after seqused_k
};

__device__ __forceinline__ SeqInfo seq_info(const Params& p, int b) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    s.q_row0 = q0;
    s.k_row0 = k0;
    s.len_q = max(p.cu_seqlens_q[b + 1] - q0, 0);
    s.len_k = max(p.cu_seqlens_k[b + 1] - k0, 0);
  } else {
    s.q_row0 = 0;
    s.k_row0 = 0;
    s.len_q = p.max_len_q;
    s.len_k = p.max_len_k;
  }
  if (p.seqused_k != nullptr) s.len_k = min(s.len_k, max(p.seqused_k[b], 0));
  return s;
}

// bias[h], else the scalar, else -log(len_k) of this sequence (the paper's default).
__device__ __forceinline__ float head_bias(const Params& p, int h, int len_k) {
  if (p.bias != nullptr) return p.bias[h];
  if (p.has_bias_value) return p.bias_value;
  return -logf(static_cast<float>(max(len_k, 1)));
}

__device__ __forceinline__ float alibi_slope(const Params& p, int b, int h) {
  return p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
}

// sigmoid(x) from exp(-|x|) in (0, 1]: nothing overflows, so x = -1e4 gives 0 and x = +1e4 gives 1
// (1 / (1 + exp(-x)) would divide by inf). Two MUFU ops (ex2, rcp); the denominator is in [1, 2].
__device__ __forceinline__ float sigmoid_fast(float x) {
  const float e = __expf(-fabsf(x));
  const float r = __fdividef(1.f, 1.f + e);
  return x >= 0.f ? r : e * r;
}

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float ex2_approx(float t) {
#if defined(ACCEL_CUDA_EMU)
  return std::exp2(t);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(t));
  return y;
#endif
}

// The parts of sigmoid(x) for the tensor-core kernels, from t = x * log2(e) (the caller folds
// log2(e) into its scale and bias): e = 2^-|t| in (0, 1] from one MUFU ex2, and r ~ 1 / (1 + e)
// on the FMA pipe (a quadratic minimax guess on [1, 2], |1 - d r| <= 0.0101, then one Newton
// step: relative error <= 1.1e-4, r never above 1 / d). Then sigmoid(x) = r (t >= 0) or e r, and
// sigmoid(x) (1 - sigmoid(x)) = e r^2 without cancellation. The softmax kernels spend one MUFU op
// per logit (exp); a plain 1 / (1 + e) would add a second (rcp), the bound of the elementwise work.
struct SigmoidParts {
  float e, r;
};
__device__ __forceinline__ SigmoidParts sigmoid_parts_base2(float t) {
  const float e = ex2_approx(-fabsf(t));
  const float d = 1.f + e;
  float r = fmaf(fmaf(0.32323232f, d, -1.45454545f), d, 2.12121212f);
  r = fmaf(r, fmaf(-d, r, 1.f), r);
  return {e, r};
}
__device__ __forceinline__ float sigmoid_base2(float t) {
  const SigmoidParts s = sigmoid_parts_base2(t);
  return t >= 0.f ? s.r : s.e * s.r;
}

// Query row i sits at key position i + offset, offset = len_k - len_q (bottom-right alignment).
// Key j is allowed for row i when j < len_k, i < len_q and j - (i + offset) lies in the window.
__device__ __forceinline__ bool allowed(const Params& p, const SeqInfo& s, int offset, int i, int j, int& dist) {
  dist = j - (i + offset);
  return j < s.len_k && i < s.len_q && (p.window_left < 0 || dist >= -p.window_left) &&
         (p.window_right < 0 || dist <= p.window_right);
}

// Keys [lo, hi) that query row i may attend to (none when i >= len_q): allowed(p, s, offset, i, j)
// == (lo <= j < hi). key_range(.., i, i, ..) gives the same for i < len_q, but its extra clamps
// cost the forward registers (a spill in one head-dim bucket), hence this one-row form.
__device__ __forceinline__ void row_key_range(const Params& p, const SeqInfo& s, int offset, int i, int& lo,
                                              int& hi) {
  if (i >= s.len_q) {
    lo = hi = 0;
    return;
  }
  long long l = 0, r = s.len_k;
  const long long pos = static_cast<long long>(i) + offset;
  if (p.window_left >= 0) l = max(l, pos - p.window_left);
  if (p.window_right >= 0) r = min(r, pos + p.window_right + 1);
  lo = static_cast<int>(l);
  hi = static_cast<int>(max(r, l));
}

// Keys [lo, hi) that any of the query rows [i_first, i_last] may attend to (hi <= lo: none).
__device__ __forceinline__ void key_range(const Params& p, const SeqInfo& s, int offset, int i_first, int i_last,
                                          int& lo, int& hi) {
  long long l = 0, r = s.len_k;
  if (p.window_left >= 0) l = max(l, static_cast<long long>(i_first) + offset - p.window_left);
  if (p.window_right >= 0) r = min(r, static_cast<long long>(i_last) + offset + p.window_right + 1);
  lo = static_cast<int>(min(l, static_cast<long long>(s.len_k)));
  hi = static_cast<int>(max(r, static_cast<long long>(lo)));
}

// Query rows [lo, hi) that any of the keys [j_first, j_last] is visible to.
__device__ __forceinline__ void query_range(const Params& p, const SeqInfo& s, int offset, int j_first, int j_last,
                                            int& lo, int& hi) {
  long long l = 0, r = s.len_q;
  if (p.window_right >= 0) l = max(l, static_cast<long long>(j_first) - offset - p.window_right);
  if (p.window_left >= 0) r = min(r, static_cast<long long>(j_last) - offset + p.window_left + 1);
  lo = static_cast<int>(min(l, static_cast<long long>(s.len_q)));
  hi = static_cast<int>(max(r, static_cast<long long>(lo)));
}

// Whether the tile rows [m0, m0 + bm) x keys [n0, n0 + bn) needs per-element masking: it crosses
// the end of the sequence or a window edge. Inner tiles skip the mask entirely.
__device__ __forceinline__ bool tile_needs_mask(const Params& p, const SeqInfo& s, int offset, int m0, int bm, int n0,
                                                int bn) {
  if (n0 + bn > s.len_k || m0 + bm > s.len_q) return true;
  const long long first = static_cast<long long>(m0) + offset, last = first + bm - 1;
  if (p.window_right >= 0 && static_cast<long long>(n0) + bn - 1 > first + p.window_right) return true;
  if (p.window_left >= 0 && static_cast<long long>(n0) < last - p.window_left) return true;
  return false;
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ tile copies (16-bit elements as raw bits)

// Shared tile [kRows][kD + 8] <- global rows: row r at src + r * row_stride. Rows >= valid_rows and
// columns >= head_dim become zeros (the zero padding of the head-dim bucket). vec: 16-byte
// cp.async (asynchronous: the caller commits and waits); else 2-byte loads stored synchronously.
// `t` and kThreads: this thread's index among the kThreads threads sharing the copy.
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* dst, const uint16_t* src, int64_t row_stride, int valid_rows,
                                          int head_dim, bool vec, int t) {
  constexpr int kChunks = kD / 8;
  constexpr int kPitch = kD + 8;
  constexpr int kTotal = kRows * kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
  if (vec) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = t + it * kThreads;
      if (kTotal % kThreads == 0 || c < kTotal) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const bool ok = r < valid_rows && col < head_dim;
        cp_async_16(dst + r * kPitch + col, ok ? src + r * row_stride + col : src, ok);
      }
    }
  } else {
    for (int it = 0; it < kIters; ++it) {
      const int c = t + it * kThreads;
      if (kTotal % kThreads == 0 || c < kTotal) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        uint16_t e[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) {
          e[x] = (r < valid_rows && col + x < head_dim) ? src[r * row_stride + col + x] : uint16_t(0);
        }
        uint4 packed;
        memcpy(&packed, e, sizeof(packed));
        *reinterpret_cast<uint4*>(dst + r * kPitch + col) = packed;
      }
    }
  }
}

// Global rows (row r at dst + r * row_stride) <- shared tile [kRows][kD + 8], rows < valid_rows and
// columns < head_dim only.
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void store_tile(uint16_t* dst, int64_t row_stride, const uint16_t* src, int valid_rows,
                                           int head_dim, bool vec, int t) {
  constexpr int kChunks = kD / 8;
  constexpr int kPitch = kD + 8;
  constexpr int kTotal = kRows * kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = t + it * kThreads;
    if ((kTotal % kThreads == 0 || c < kTotal)) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      if (r < valid_rows && col < head_dim) {
        if (vec) {
          *reinterpret_cast<uint4*>(dst + r * row_stride + col) = *reinterpret_cast<const uint4*>(src + r * kPitch + col);
        } else {
          for (int x = 0; x < 8 && col + x < head_dim; ++x) dst[r * row_stride + col + x] = src[r * kPitch + col + x];
        }
      }
    }
  }
}

}  // namespace detail
}  // namespace accel::sigmoid_attention::cuda
