// Tensor-core kernels of sigmoid attention (fp16/bf16, sm_80+), FlashAttention-2 style, and the
// device helpers they share with the fp32 kernels. Included only by the kernel .cu files, each of
// which instantiates one dtype, so the 8 head-dim buckets of a (dtype, direction) build in
// parallel with the others.
//
// Warp-level GEMMs use mma.sync.m16n8k16 (fp32 accumulate) with ldmatrix from shared memory. The
// fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = threadIdx.x % 32:
//   A 16x16 (row major): a0 (r, c), a1 (r + 8, c), a2 (r, c + 8), a3 (r + 8, c + 8),
//                        r = lane / 4, c = 2 * (lane % 4) + {0, 1}
//   B 16x8  (k x n):     b0 (k, n), b1 (k + 8, n), k = 2 * (lane % 4) + {0, 1}, n = lane / 4
//   C 16x8:              c0, c1 (r, c), c2, c3 (r + 8, c)
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i and
// every lane receives (row lane / 4, cols 2 * (lane % 4) + {0, 1}) of each matrix (.trans: the
// transposed element). Shared tiles are row major with a pitch of D + 8 elements (16 bytes times
// an odd number), so the 8 row addresses of a matrix hit 8 different 16-byte bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_portable.h"

#include <cstdint>
#include <cstring>

#include "sigmoid_attention/cuda/sigmoid_attention_cuda.h"

namespace accel::sigmoid_attention::cuda {
namespace detail {

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
// cost the forward registers (ptxas: an 8-byte spill in one head-dim bucket on sm_90), hence this
// one-row form.
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

// ------------------------------------------------------------------ PTX wrappers

#if defined(ACCEL_CUDA_EMU)
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) { return ::accel::cuda_emu::shared_address(ptr); }
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::accel::cuda_emu::cp_async_16(smem, gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { ::accel::cuda_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::accel::cuda_emu::cp_async_wait(N);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ::accel::cuda_emu::ldmatrix(r, 4, false, addr); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  ::accel::cuda_emu::ldmatrix(r, 4, true, addr);
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  ::accel::cuda_emu::ldmatrix(r, 2, true, addr);
}
#else
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy that bypasses L1; valid = false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
#endif  // ACCEL_CUDA_EMU

template <typename T>
struct Tc;  // tensor-core traits of a 16-bit type

template <>
struct Tc<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(ACCEL_CUDA_EMU)
    ::accel::cuda_emu::mma_m16n8k16(c, a, b0, b1, false);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  // lo goes to the low 16 bits: the element with the smaller column index in a fragment
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
};

template <>
struct Tc<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(ACCEL_CUDA_EMU)
    ::accel::cuda_emu::mma_m16n8k16(c, a, b0, b1, true);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
};

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

// ------------------------------------------------------------------ forward

// One CTA per (query block, head, batch[, key split]); warp w owns kMTiles * 16 consecutive query
// rows of the block. Q stays in shared memory; K and V tiles of kBlockN keys stream through one
// buffer each, overlapped as in FlashAttention-2: V_j loads while S = Q K_j^T is computed, K_{j+1}
// loads while O += P V_j is computed. P = sigmoid(scale S + bias [+ alibi]) stays in registers (the
// S accumulator layout is the A-operand layout of the next mma). No max, no sum, no rescale.
//
// Two m16 tiles per warp (kD <= 128) make every K / V fragment read from shared memory feed two
// mma instead of one: with one, the ldmatrix traffic (about 128 bytes per mma) and not the tensor
// cores bounds the loop. The O accumulator takes kMTiles * kD / 2 fp32 registers per thread (128 at
// kD = 128); kD > 128 keeps one m16 tile per warp and key tiles of 32 to stay within 255 registers.
template <int kD>
struct FwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kMTiles = kD <= 128 ? 2 : 1;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMinBlocks = kD <= 128 ? 2 : 1;
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kBlockM = kRowsPerWarp * kWarps;
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;
  static constexpr int kPitch = kD + 8;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kPitch * 2;
};

template <typename T, int kD>
__global__ void __launch_bounds__(FwdConfig<kD>::kThreads, FwdConfig<kD>::kMinBlocks)
    sigmoid_attention_fwd_kernel(const Params p) {
  using Cfg = FwdConfig<kD>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch, kThreads = Cfg::kThreads;
  constexpr int kMT = Cfg::kMTiles, kRowsPerWarp = Cfg::kRowsPerWarp;
  constexpr int kTilesS = kBlockN / 8;  // n-tiles of the S accumulator (16 x kBlockN per m-tile)
  constexpr int kTilesO = kD / 8;       // n-tiles of the O accumulator (16 x kD per m-tile)

  ACCEL_DYNAMIC_SMEM(unsigned char, smem_raw);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + kBlockM * kPitch;
  uint16_t* sV = sK + kBlockN * kPitch;

  // Heavy blocks first: with a causal mask the last query blocks see the most keys.
  const int n_m_blocks = static_cast<int>(gridDim.x) / p.num_splits;
  const int m_block = n_m_blocks - 1 - static_cast<int>(blockIdx.x) / p.num_splits;
  const int split = static_cast<int>(blockIdx.x) % p.num_splits;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo s = seq_info(p, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= s.len_q) return;
  const int hk = h / p.group;
  const int offset = s.len_k - s.len_q;

  int n_lo, n_hi;
  key_range(p, s, offset, m0, min(m0 + kBlockM, s.len_q) - 1, n_lo, n_hi);
  int nb_lo = n_lo / kBlockN;
  int nb_hi = n_hi > n_lo ? ceil_div(n_hi, kBlockN) : nb_lo;
  if (p.num_splits > 1) {
    const int per = ceil_div(nb_hi - nb_lo, p.num_splits);
    const int first = min(nb_hi, nb_lo + split * per);
    nb_hi = min(nb_hi, first + per);
    nb_lo = first;
    if (nb_lo >= nb_hi) return;  // adds nothing to the zeroed accumulator
  }

  const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                      (s.q_row0 + m0) * p.q_row_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                      s.k_row0 * p.k_row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                      s.k_row0 * p.v_row_stride;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // logits in base-2 units: sigmoid_base2 takes x * log2(e)
  const float scale2 = p.scale * kLog2e;
  const float bias2 = head_bias(p, h, s.len_k) * kLog2e;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const float slope2 = alibi_slope(p, b, h) * kLog2e;
  // query row of accumulator elements 0, 1 of m-tile 0 (m-tile mi: + 16 mi; elements 2, 3: + 8)
  const int row0 = m0 + warp * kRowsPerWarp + lane / 4;
  const int col0 = (lane % 4) * 2;  // column of element 0 within an n-tile

  float acc_o[kMT][kTilesO][4];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int i = 0; i < kTilesO; ++i) acc_o[mi][i][0] = acc_o[mi][i][1] = acc_o[mi][i][2] = acc_o[mi][i][3] = 0.f;
  }

  if (nb_lo < nb_hi) {
    load_tile<kBlockM, kD, kThreads>(sQ, q, p.q_row_stride, s.len_q - m0, p.head_dim, p.vec_load, tid);
    load_tile<kBlockN, kD, kThreads>(sK, k + static_cast<int64_t>(nb_lo) * kBlockN * p.k_row_stride, p.k_row_stride,
                                     s.len_k - nb_lo * kBlockN, p.head_dim, p.vec_load, tid);
    cp_async_commit();

    // Per-lane ldmatrix addresses (bytes). A operand (Q, 16 x 16 at (0, 0) of m-tile 0): row
    // lane % 16, col 8 * (lane / 16); m-tile mi is 16 rows further down. B operand of S (K rows =
    // keys, non-transposed): matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7),
    // (keys 8-15, d 8-15) -> b0, b1 of two key n-tiles. B operand of O (V rows = keys, transposed):
    // matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15) ->
    // b0, b1 of two d n-tiles.
    const uint32_t a_q = smem_u32(sQ + (warp * kRowsPerWarp + lane % 16) * kPitch + (lane / 16) * 8);
    const uint32_t b_k = smem_u32(sK + (lane % 8 + (lane / 16) * 8) * kPitch + ((lane / 8) % 2) * 8);
    const uint32_t b_v = smem_u32(sV + (lane % 8 + ((lane / 8) % 2) * 8) * kPitch + (lane / 16) * 8);
    constexpr uint32_t kMTileBytes = 16 * kPitch * 2;

    for (int nb = nb_lo; nb < nb_hi; ++nb) {
      const int n0 = nb * kBlockN;
      cp_async_wait<0>();
      __syncthreads();  // K_nb (and Q) landed; every warp is done with V_{nb-1}
      load_tile<kBlockN, kD, kThreads>(sV, v + static_cast<int64_t>(n0) * p.v_row_stride, p.v_row_stride,
                                       s.len_k - n0, p.head_dim, p.vec_load, tid);
      cp_async_commit();

      float acc_s[kMT][kTilesS][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int i = 0; i < kTilesS; ++i) acc_s[mi][i][0] = acc_s[mi][i][1] = acc_s[mi][i][2] = acc_s[mi][i][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) ldmatrix_x4(a[mi], a_q + mi * kMTileBytes + kk * 32);
#pragma unroll
        for (int np = 0; np < kBlockN / 16; ++np) {
          uint32_t bf[4];
          ldmatrix_x4(bf, b_k + (np * 16 * kPitch + kk * 16) * 2);
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            Tc<T>::mma(acc_s[mi][2 * np], a[mi], bf[0], bf[1]);
            Tc<T>::mma(acc_s[mi][2 * np + 1], a[mi], bf[2], bf[3]);
          }
        }
      }

      if (has_alibi || tile_needs_mask(p, s, offset, m0, kBlockM, n0, kBlockN)) {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            // the keys row i may see, as offsets from this lane's first column: [lo, hi)
            const int i = row0 + mi * 16 + half * 8;
            int lo, hi;
            row_key_range(p, s, offset, i, lo, hi);
            const int c0 = n0 + col0, pos = i + offset;
#pragma unroll
            for (int nt = 0; nt < kTilesS; ++nt) {
#pragma unroll
              for (int x = 0; x < 2; ++x) {
                const int j = c0 + nt * 8 + x;
                float& a = acc_s[mi][nt][half * 2 + x];
                const float t = fmaf(a, scale2, bias2) - slope2 * static_cast<float>(abs(j - pos));
                a = (j >= lo && j < hi) ? sigmoid_base2(t) : 0.f;
              }
            }
          }
        }
      } else {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
          for (int nt = 0; nt < kTilesS; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[mi][nt][e] = sigmoid_base2(fmaf(acc_s[mi][nt][e], scale2, bias2));
          }
        }
      }
      // C layout of key n-tiles 2t, 2t + 1 == A layout of the 16-key k-step t.
      uint32_t a_p[kMT][kBlockN / 16][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
        for (int t = 0; t < kBlockN / 16; ++t) {
          a_p[mi][t][0] = Tc<T>::pack(acc_s[mi][2 * t][0], acc_s[mi][2 * t][1]);
          a_p[mi][t][1] = Tc<T>::pack(acc_s[mi][2 * t][2], acc_s[mi][2 * t][3]);
          a_p[mi][t][2] = Tc<T>::pack(acc_s[mi][2 * t + 1][0], acc_s[mi][2 * t + 1][1]);
          a_p[mi][t][3] = Tc<T>::pack(acc_s[mi][2 * t + 1][2], acc_s[mi][2 * t + 1][3]);
        }
      }

      cp_async_wait<0>();
      __syncthreads();  // V_nb landed; every warp is done with K_nb
      if (nb + 1 < nb_hi) {
        const int n1 = n0 + kBlockN;
        load_tile<kBlockN, kD, kThreads>(sK, k + static_cast<int64_t>(n1) * p.k_row_stride, p.k_row_stride,
                                         s.len_k - n1, p.head_dim, p.vec_load, tid);
        cp_async_commit();
      }
#pragma unroll
      for (int t = 0; t < kBlockN / 16; ++t) {
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, b_v + (t * 16 * kPitch + dp * 16) * 2);
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            Tc<T>::mma(acc_o[mi][2 * dp], a_p[mi][t], bf[0], bf[1]);
            Tc<T>::mma(acc_o[mi][2 * dp + 1], a_p[mi][t], bf[2], bf[3]);
          }
        }
      }
    }
  }

  if (p.o_accum != nullptr) {  // split-KV: add this part of the key range
    float* o = p.o_accum + b * p.o_batch_stride + h * p.o_head_stride + s.q_row0 * p.o_row_stride;
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int nt = 0; nt < kTilesO; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row0 + mi * 16 + (e / 2) * 8, d = nt * 8 + col0 + (e % 2);
          if (i < s.len_q && d < p.head_dim) atomicAdd(o + i * p.o_row_stride + d, acc_o[mi][nt][e]);
        }
      }
    }
    return;
  }

  // Stage the warp's output rows in its own rows of sQ (no other warp reads them), then store
  // whole 16-byte chunks.
  uint16_t* sO = sQ + warp * kRowsPerWarp * kPitch;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int nt = 0; nt < kTilesO; ++nt) {
      uint16_t* dst = sO + (mi * 16 + lane / 4) * kPitch + nt * 8 + col0;
      *reinterpret_cast<uint32_t*>(dst) = Tc<T>::pack(acc_o[mi][nt][0], acc_o[mi][nt][1]);
      *reinterpret_cast<uint32_t*>(dst + 8 * kPitch) = Tc<T>::pack(acc_o[mi][nt][2], acc_o[mi][nt][3]);
    }
  }
  __syncwarp();
  const int first_row = m0 + warp * kRowsPerWarp;
  uint16_t* o = static_cast<uint16_t*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride +
                (s.q_row0 + first_row) * p.o_row_stride;
  store_tile<kRowsPerWarp, kD, 32>(o, p.o_row_stride, sO, s.len_q - first_row, p.head_dim, p.vec_store, lane);
}

template <typename T, int kD>
cudaError_t launch_fwd(const Params& p, cudaStream_t stream) {
  using Cfg = FwdConfig<kD>;
  auto kernel = &sigmoid_attention_fwd_kernel<T, kD>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
    if (e != cudaSuccess) return e;
  }
  const int n_m_blocks = ceil_div(p.max_len_q, Cfg::kBlockM);
  const dim3 grid(static_cast<unsigned>(n_m_blocks * p.num_splits), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  ACCEL_LAUNCH(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
  return cudaGetLastError();
}

// ------------------------------------------------------------------ backward

// One CTA per (key block of 64, kv head, batch), 8 warps. K and V of the block stay in shared
// memory; the CTA loops over the query heads of its GQA group and over the query blocks that can
// see its keys (so dK, dV of a kv head sum over its query heads without races), with Q and dO
// double buffered (the next block loads during the current one). Per query block:
//   A: S^T = K Q^T, dP^T = V dO^T (warp: 16 keys x kBlockM/2 queries), P^T = sigmoid(...) masked,
//      dS^T = dP^T * P^T * (1 - P^T) -- no rowsum(dO * O) term: sigmoid is elementwise.
//      P^T, dS^T go to shared memory in the input dtype.
//   B: dV += P^T dO, dK += dS^T Q (warp: 16 keys x kD/2 dims, fp32 registers for the whole loop).
//   C: dQ += scale dS K (warp: 16 queries x kD/(8 / (kBlockM/16)) dims), added with fp32 atomics
//      into a zeroed buffer that the host converts afterwards.
// Why atomics for dQ rather than a separate dQ kernel: a dQ kernel would recompute S and dP (two
// more GEMMs, 7 instead of 5 per tile pair); the atomics are fire-and-forget RED.F32 into L2, one
// per dQ element per (query block, key block) pair, which costs less than those GEMMs. The price
// is a run-to-run nondeterministic summation order of dQ (dK and dV are deterministic).
template <int kD>
struct BwdConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 64;                   // keys per CTA: 4 warp rows of 16
  static constexpr int kBlockM = kD <= 128 ? 64 : 32;  // queries per step (shared memory bound)
  static constexpr int kPitch = kD + 8;
  static constexpr int kPitchP = kBlockM + 8;  // P^T / dS^T tiles: 16 bytes times an odd number
  static constexpr int kAQ = kBlockM / 2;      // phase A: queries per warp
  static constexpr int kCQGroups = kBlockM / 16;
  static constexpr int kCD = kD / (kWarps / kCQGroups);  // phase C: dims per warp (a multiple of 8)
  static constexpr int kSmemBytes = (4 * kBlockM * kPitch + 2 * kBlockN * kPitch + 2 * kBlockN * kPitchP) * 2;
  static_assert(kCD % 8 == 0 && kAQ % 16 == 0 && kD % 32 == 0, "tile shape");
};

template <typename T, int kD>
__global__ void __launch_bounds__(BwdConfig<kD>::kThreads, 1) sigmoid_attention_bwd_kernel(const Params p) {
  using Cfg = BwdConfig<kD>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kPitch = Cfg::kPitch, kPitchP = Cfg::kPitchP;
  constexpr int kThreads = Cfg::kThreads, kAQ = Cfg::kAQ, kCQGroups = Cfg::kCQGroups, kCD = Cfg::kCD;
  constexpr int kTilesA = kAQ / 8;   // n-tiles of S^T / dP^T per warp
  constexpr int kTilesB = kD / 16;   // n-tiles of dK / dV per warp (kD / 2 dims)

  ACCEL_DYNAMIC_SMEM(unsigned char, smem_raw);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);  // [2][kBlockM][kPitch]
  uint16_t* sdO = sQ + 2 * kBlockM * kPitch;              // [2][kBlockM][kPitch]
  uint16_t* sK = sdO + 2 * kBlockM * kPitch;              // [kBlockN][kPitch]
  uint16_t* sV = sK + kBlockN * kPitch;                   // [kBlockN][kPitch]
  uint16_t* sP = sV + kBlockN * kPitch;                   // P^T  [kBlockN][kPitchP]
  uint16_t* sdS = sP + kBlockN * kPitchP;                 // dS^T [kBlockN][kPitchP]

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqInfo s = seq_info(p, b);
  const int n0 = n_block * kBlockN;
  // Keys past len_k: dk/dv rows there are zero from the allocation (only seqused_k or varlen
  // leave such rows; in plain dense mode every key row is covered by some CTA).
  if (n0 >= s.len_k) return;
  const int offset = s.len_k - s.len_q;
  int q_lo, q_hi;
  query_range(p, s, offset, n0, min(n0 + kBlockN, s.len_k) - 1, q_lo, q_hi);
  const int mb_lo = q_lo / kBlockM;
  const int n_mb = q_hi > q_lo ? ceil_div(q_hi, kBlockM) - mb_lo : 0;
  const int n_iters = n_mb * p.group;

  const uint16_t* k = static_cast<const uint16_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                      (s.k_row0 + n0) * p.k_row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                      (s.k_row0 + n0) * p.v_row_stride;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int kr = warp % 4;          // phases A, B: keys [16 kr, 16 kr + 16)
  const int half = warp / 4;        // phase A: queries [kAQ half, ...); phase B: dims [kD/2 half, ...)
  const int qg = warp % kCQGroups;  // phase C: queries [16 qg, 16 qg + 16)
  const int dc = warp / kCQGroups;  // phase C: dims [kCD dc, kCD dc + kCD)
  const float scale = p.scale, scale2 = p.scale * kLog2e;
  const bool has_alibi = p.alibi_slopes != nullptr;

  float acc_dk[kTilesB][4], acc_dv[kTilesB][4];
#pragma unroll
  for (int i = 0; i < kTilesB; ++i) {
    acc_dk[i][0] = acc_dk[i][1] = acc_dk[i][2] = acc_dk[i][3] = 0.f;
    acc_dv[i][0] = acc_dv[i][1] = acc_dv[i][2] = acc_dv[i][3] = 0.f;
  }

  // Iteration it: query head hk * group + it / n_mb, query block mb_lo + it % n_mb.
  auto load_q_do = [&](int it, int buf) {
    const int h = hk * p.group + it / n_mb, m0 = (mb_lo + it % n_mb) * kBlockM;
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                        (s.q_row0 + m0) * p.q_row_stride;
    const uint16_t* dout = static_cast<const uint16_t*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                           (s.q_row0 + m0) * p.do_row_stride;
    load_tile<kBlockM, kD, kThreads>(sQ + buf * kBlockM * kPitch, q, p.q_row_stride, s.len_q - m0, p.head_dim,
                                     p.vec_load, tid);
    load_tile<kBlockM, kD, kThreads>(sdO + buf * kBlockM * kPitch, dout, p.do_row_stride, s.len_q - m0, p.head_dim,
                                     p.vec_load, tid);
  };

  if (n_iters > 0) {
    load_tile<kBlockN, kD, kThreads>(sK, k, p.k_row_stride, s.len_k - n0, p.head_dim, p.vec_load, tid);
    load_tile<kBlockN, kD, kThreads>(sV, v, p.v_row_stride, s.len_k - n0, p.head_dim, p.vec_load, tid);
    load_q_do(0, 0);
    cp_async_commit();

    // Lane addresses (bytes) that do not depend on the iteration (see the forward for the
    // matrix order of each operand kind).
    const uint32_t a_k = smem_u32(sK + (kr * 16 + lane % 16) * kPitch + (lane / 16) * 8);
    const uint32_t a_v = smem_u32(sV + (kr * 16 + lane % 16) * kPitch + (lane / 16) * 8);
    const uint32_t a_p = smem_u32(sP + (kr * 16 + lane % 16) * kPitchP + (lane / 16) * 8);
    const uint32_t a_ds = smem_u32(sdS + (kr * 16 + lane % 16) * kPitchP + (lane / 16) * 8);
    // dS as the A operand of dQ = dS K, read transposed from dS^T: matrices (keys 0-7, queries
    // 0-7), (keys 0-7, queries 8-15), (keys 8-15, queries 0-7), (keys 8-15, queries 8-15).
    const uint32_t a_dst = smem_u32(sdS + (lane % 8 + (lane / 16) * 8) * kPitchP + qg * 16 + ((lane / 8) % 2) * 8);
    const uint32_t b_kt = smem_u32(sK + (lane % 8 + ((lane / 8) % 2) * 8) * kPitch + dc * kCD + (lane / 16) * 8);
    const int b_rows_nt = (lane % 8 + (lane / 16) * 8) * kPitch + ((lane / 8) % 2) * 8;  // B, non-transposed
    const int b_rows_t = (lane % 8 + ((lane / 8) % 2) * 8) * kPitch + (lane / 16) * 8;  // B, transposed

    for (int it = 0; it < n_iters; ++it) {
      const int buf = it & 1;
      if (it + 1 < n_iters) {
        load_q_do(it + 1, buf ^ 1);  // that buffer was last read before the previous trailing barrier
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();

      const int h = hk * p.group + it / n_mb, m0 = (mb_lo + it % n_mb) * kBlockM;
      const uint16_t* cQ = sQ + buf * kBlockM * kPitch;
      const uint16_t* cdO = sdO + buf * kBlockM * kPitch;
      const float bias2 = head_bias(p, h, s.len_k) * kLog2e;  // base-2 logits (sigmoid_parts_base2)
      const float slope2 = alibi_slope(p, b, h) * kLog2e;

      // ---- A: S^T and dP^T for keys [16 kr, +16) x queries [kAQ half, +kAQ)
      {
        float acc_s[kTilesA][4], acc_dp[kTilesA][4];
#pragma unroll
        for (int i = 0; i < kTilesA; ++i) {
          acc_s[i][0] = acc_s[i][1] = acc_s[i][2] = acc_s[i][3] = 0.f;
          acc_dp[i][0] = acc_dp[i][1] = acc_dp[i][2] = acc_dp[i][3] = 0.f;
        }
        const uint32_t b_q = smem_u32(cQ + half * kAQ * kPitch + b_rows_nt);
        const uint32_t b_o = smem_u32(cdO + half * kAQ * kPitch + b_rows_nt);
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          uint32_t ak[4], av[4];
          ldmatrix_x4(ak, a_k + kk * 32);
          ldmatrix_x4(av, a_v + kk * 32);
#pragma unroll
          for (int qp = 0; qp < kAQ / 16; ++qp) {
            uint32_t bq[4], bo[4];
            ldmatrix_x4(bq, b_q + (qp * 16 * kPitch + kk * 16) * 2);
            ldmatrix_x4(bo, b_o + (qp * 16 * kPitch + kk * 16) * 2);
            Tc<T>::mma(acc_s[2 * qp], ak, bq[0], bq[1]);
            Tc<T>::mma(acc_s[2 * qp + 1], ak, bq[2], bq[3]);
            Tc<T>::mma(acc_dp[2 * qp], av, bo[0], bo[1]);
            Tc<T>::mma(acc_dp[2 * qp + 1], av, bo[2], bo[3]);
          }
        }
        // Element e of n-tile nt: key n0 + 16 kr + lane / 4 (+8 for e >= 2), query
        // m0 + kAQ half + 8 nt + 2 (lane % 4) + e % 2.
        const int key0 = n0 + kr * 16 + lane / 4;
        const int query0 = m0 + half * kAQ + (lane % 4) * 2;
        const bool masked = has_alibi || tile_needs_mask(p, s, offset, m0, kBlockM, n0, kBlockN);
#pragma unroll
        for (int nt = 0; nt < kTilesA; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float t = fmaf(acc_s[nt][e], scale2, bias2);
            bool ok = true;
            if (masked) {
              int dist;
              ok = allowed(p, s, offset, query0 + nt * 8 + e % 2, key0 + (e / 2) * 8, dist);
              t -= slope2 * static_cast<float>(abs(dist));
            }
            const SigmoidParts sp = sigmoid_parts_base2(t);
            const float er = sp.e * sp.r;
            // P and P (1 - P) = e r^2 (no 1 - P cancellation where P is close to 1)
            acc_s[nt][e] = ok ? (t >= 0.f ? sp.r : er) : 0.f;
            acc_dp[nt][e] *= ok ? er * sp.r : 0.f;
          }
        }
#pragma unroll
        for (int nt = 0; nt < kTilesA; ++nt) {
          const int off = (kr * 16 + lane / 4) * kPitchP + half * kAQ + nt * 8 + (lane % 4) * 2;
          *reinterpret_cast<uint32_t*>(sP + off) = Tc<T>::pack(acc_s[nt][0], acc_s[nt][1]);
          *reinterpret_cast<uint32_t*>(sP + off + 8 * kPitchP) = Tc<T>::pack(acc_s[nt][2], acc_s[nt][3]);
          *reinterpret_cast<uint32_t*>(sdS + off) = Tc<T>::pack(acc_dp[nt][0], acc_dp[nt][1]);
          *reinterpret_cast<uint32_t*>(sdS + off + 8 * kPitchP) = Tc<T>::pack(acc_dp[nt][2], acc_dp[nt][3]);
        }
      }
      __syncthreads();  // P^T, dS^T complete

      // ---- B: dV += P^T dO, dK += dS^T Q for keys [16 kr, +16) x dims [kD/2 half, +kD/2)
      {
        const uint32_t b_o = smem_u32(cdO + half * (kD / 2) + b_rows_t);
        const uint32_t b_q = smem_u32(cQ + half * (kD / 2) + b_rows_t);
#pragma unroll
        for (int t = 0; t < kBlockM / 16; ++t) {
          uint32_t ap[4], ads[4];
          ldmatrix_x4(ap, a_p + t * 32);
          ldmatrix_x4(ads, a_ds + t * 32);
#pragma unroll
          for (int dp = 0; dp < kD / 32; ++dp) {
            uint32_t bo[4], bq[4];
            ldmatrix_x4_trans(bo, b_o + (t * 16 * kPitch + dp * 16) * 2);
            ldmatrix_x4_trans(bq, b_q + (t * 16 * kPitch + dp * 16) * 2);
            Tc<T>::mma(acc_dv[2 * dp], ap, bo[0], bo[1]);
            Tc<T>::mma(acc_dv[2 * dp + 1], ap, bo[2], bo[3]);
            Tc<T>::mma(acc_dk[2 * dp], ads, bq[0], bq[1]);
            Tc<T>::mma(acc_dk[2 * dp + 1], ads, bq[2], bq[3]);
          }
        }
      }

      // ---- C: dQ[queries 16 qg.., dims kCD dc..] += scale * dS K, atomically
      {
        uint32_t a_dq[kBlockN / 16][4];
#pragma unroll
        for (int t = 0; t < kBlockN / 16; ++t) ldmatrix_x4_trans(a_dq[t], a_dst + t * 16 * kPitchP * 2);
        const int first_row = m0 + qg * 16;
        const int rows = s.len_q - first_row;
        float* dq = p.dq_accum + b * p.o_batch_stride + h * p.o_head_stride + (s.q_row0 + first_row) * p.o_row_stride;
        const int d0 = dc * kCD + (lane % 4) * 2;
#pragma unroll
        for (int dp = 0; dp < kCD / 16; ++dp) {
          float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int t = 0; t < kBlockN / 16; ++t) {
            uint32_t bk[4];
            ldmatrix_x4_trans(bk, b_kt + (t * 16 * kPitch + dp * 16) * 2);
            Tc<T>::mma(acc[0], a_dq[t], bk[0], bk[1]);
            Tc<T>::mma(acc[1], a_dq[t], bk[2], bk[3]);
          }
#pragma unroll
          for (int x = 0; x < 2; ++x) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = lane / 4 + (e / 2) * 8, d = d0 + dp * 16 + x * 8 + e % 2;
              if (r < rows && d < p.head_dim) atomicAdd(dq + r * p.o_row_stride + d, scale * acc[x][e]);
            }
          }
        }
        if constexpr ((kCD / 8) % 2 == 1) {  // an odd n-tile left over (kD = 160, 224)
          constexpr int kLast = (kCD / 16) * 16;
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int t = 0; t < kBlockN / 16; ++t) {
            uint32_t bk[2];
            ldmatrix_x2_trans(bk, b_kt + (t * 16 * kPitch + kLast) * 2);  // lanes 0-15 address it
            Tc<T>::mma(acc, a_dq[t], bk[0], bk[1]);
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = lane / 4 + (e / 2) * 8, d = d0 + kLast + e % 2;
            if (r < rows && d < p.head_dim) atomicAdd(dq + r * p.o_row_stride + d, scale * acc[e]);
          }
        }
      }
      __syncthreads();  // everyone is done with this buffer, P^T and dS^T
    }
  }

  // dK = scale * dS^T Q, dV: staged through sK / sV, then 16-byte stores. sK / sV are free: the
  // last iteration waited for every copy group and ended with a barrier after its last read
  // (scripts/emu_mutations.py found the wait and barrier that stood here redundant).
#pragma unroll
  for (int nt = 0; nt < kTilesB; ++nt) {
    const int off = (kr * 16 + lane / 4) * kPitch + half * (kD / 2) + nt * 8 + (lane % 4) * 2;
    *reinterpret_cast<uint32_t*>(sK + off) = Tc<T>::pack(scale * acc_dk[nt][0], scale * acc_dk[nt][1]);
    *reinterpret_cast<uint32_t*>(sK + off + 8 * kPitch) = Tc<T>::pack(scale * acc_dk[nt][2], scale * acc_dk[nt][3]);
    *reinterpret_cast<uint32_t*>(sV + off) = Tc<T>::pack(acc_dv[nt][0], acc_dv[nt][1]);
    *reinterpret_cast<uint32_t*>(sV + off + 8 * kPitch) = Tc<T>::pack(acc_dv[nt][2], acc_dv[nt][3]);
  }
  __syncthreads();
  const int64_t out_off = b * p.dk_batch_stride + hk * p.dk_head_stride + (s.k_row0 + n0) * p.dk_row_stride;
  store_tile<kBlockN, kD, kThreads>(static_cast<uint16_t*>(p.dk) + out_off, p.dk_row_stride, sK, s.len_k - n0,
                                    p.head_dim, p.vec_store, tid);
  store_tile<kBlockN, kD, kThreads>(static_cast<uint16_t*>(p.dv) + out_off, p.dk_row_stride, sV, s.len_k - n0,
                                    p.head_dim, p.vec_store, tid);
}

template <typename T, int kD>
cudaError_t launch_bwd(const Params& p, cudaStream_t stream) {
  using Cfg = BwdConfig<kD>;
  auto kernel = &sigmoid_attention_bwd_kernel<T, kD>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_len_k, Cfg::kBlockN)), static_cast<unsigned>(p.heads_kv),
                  static_cast<unsigned>(p.batch));
  ACCEL_LAUNCH(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
  return cudaGetLastError();
}

// One switch per (dtype, direction): the only place the head-dim buckets are instantiated.
template <typename T>
cudaError_t dispatch_fwd(const Params& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.head_dim)) {
    case 32: return launch_fwd<T, 32>(p, stream);
    case 64: return launch_fwd<T, 64>(p, stream);
    case 96: return launch_fwd<T, 96>(p, stream);
    case 128: return launch_fwd<T, 128>(p, stream);
    case 160: return launch_fwd<T, 160>(p, stream);
    case 192: return launch_fwd<T, 192>(p, stream);
    case 224: return launch_fwd<T, 224>(p, stream);
    case 256: return launch_fwd<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t dispatch_bwd(const Params& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.head_dim)) {
    case 32: return launch_bwd<T, 32>(p, stream);
    case 64: return launch_bwd<T, 64>(p, stream);
    case 96: return launch_bwd<T, 96>(p, stream);
    case 128: return launch_bwd<T, 128>(p, stream);
    case 160: return launch_bwd<T, 160>(p, stream);
    case 192: return launch_bwd<T, 192>(p, stream);
    case 224: return launch_bwd<T, 224>(p, stream);
    case 256: return launch_bwd<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace accel::sigmoid_attention::cuda
