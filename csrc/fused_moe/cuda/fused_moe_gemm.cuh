// The grouped GEMM behind every fused MoE matrix product, templated on the element type and the
// GemmMode (fused_moe_cuda.cuh says what each mode computes). Included by the three
// fused_moe_gemm_*_cuda.cu files only.
//
// One CTA computes a kBlockM x kBlockN tile of C = A B^T with both operands staged in shared
// memory K-contiguous ([row][k], pitch kPitch). An operand is either "K-major" in global memory
// (each of its rows is a line contiguous along k: x, hbuf, dgu, W1/W2 in the forward) or
// "MN-major" (each k is a line contiguous along m or n: W2 and W1 in the backward, and every
// operand of the weight gradients, whose K runs over token rows); MN-major chunks are transposed
// on their way into shared memory, so one compute path serves both.
//
// Loads go global -> registers -> shared with a double-buffered shared tile: the next k-tile's
// loads are in flight while the tensor cores work on the current one (one barrier per k-tile).
// Lines with no data (padding rows, rows past M or N, k past the end) read as zeros, so tails
// need no special code; 16-byte loads are used where the line is 16-byte aligned and the chunk
// lies inside it, 2- or 4-byte loads elsewhere (odd H or I, misaligned tensors).
//
// fp16/bf16: 4 warps, each a 32 x 32 sub-tile with mma.sync.m16n8k16 (fp32 accumulation) fed by
// ldmatrix (common/cuda_mma.cuh gives the fragment layouts). B is stored [n][k], so a
// non-transposed 8x8 load of rows n, columns k is exactly the b0 (or b1) fragment. A pitch of
// kBK + 8 elements (80 bytes) puts the 8 row addresses of a matrix in 8 different 16-byte bank groups.
// float32: 256 threads, each a 4 x 4 micro-tile with FMAs (pitch kBK + 1: conflict-free columns).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cuda_mma.cuh"
#include "common/cuda_portable.h"
#include "fused_moe/cuda/fused_moe_cuda.cuh"

namespace accel::fused_moe::cuda::gemm {

using namespace ::accel::cuda_mma;

constexpr int kBM = kBlockM;
constexpr int kBN = kBlockN;

template <typename T>
struct Cfg {  // fp16 / bf16: tensor cores
  static constexpr int kThreads = 128, kBK = 32, kVec = 8, kPitch = kBK + 8;
  using Bits = uint16_t;
};
template <>
struct Cfg<float> {  // fp32: SIMT
  static constexpr int kThreads = 256, kBK = 16, kVec = 4, kPitch = kBK + 1;
  using Bits = float;
};

// 16 bytes of consecutive elements of one line.
template <typename T>
union Chunk {
  uint4 v;
  typename Cfg<T>::Bits e[Cfg<T>::kVec];
};

// ------------------------------------------------------------------ operand access

// Address of memory line `line` of an operand, or nullptr when the line holds no data (a padding
// row of the sorted buffer). Bounds on `line` itself are the caller's.
template <typename T>
__device__ __forceinline__ const T* line_ptr(const Operand& op, const T* base, int line, const int* sorted,
                                             int top_k) {
  if (op.gather == Gather::Direct) return base + static_cast<int64_t>(line) * op.ld;
  const int pair = sorted[line];
  if (pair < 0) return nullptr;
  const int64_t idx = op.gather == Gather::Token ? pair / top_k : line;
  return base + idx * op.ld;
}

// kVec consecutive elements [idx, idx + kVec) of a line; those at or past `limit` read as zero.
template <typename T>
__device__ __forceinline__ void load_chunk(Chunk<T>& c, const T* line, int idx, int limit, bool vec) {
  using Bits = typename Cfg<T>::Bits;
  constexpr int kVec = Cfg<T>::kVec;
  if (line == nullptr || idx >= limit) {
    c.v = make_uint4(0u, 0u, 0u, 0u);
    return;
  }
  if (vec && idx + kVec <= limit) {
    c.v = __ldg(reinterpret_cast<const uint4*>(line + idx));
    return;
  }
  const Bits* src = reinterpret_cast<const Bits*>(line) + idx;
#pragma unroll
  for (int i = 0; i < kVec; ++i) c.e[i] = idx + i < limit ? src[i] : Bits(0);
}

// ------------------------------------------------------------------ the kernel

template <typename T, GemmMode kMode>
__global__ void __launch_bounds__(Cfg<T>::kThreads) moe_gemm_kernel(const GemmParams p) {
  using C = Cfg<T>;
  using Bits = typename C::Bits;
  constexpr int kThreads = C::kThreads, kBK = C::kBK, kVec = C::kVec, kPitch = C::kPitch;
  constexpr bool kTensorCores = !std::is_same_v<T, float>;
  constexpr bool kDual = kMode == GemmMode::UpFwd;         // gate and up tiles share the A tile
  constexpr bool kRows = kMode != GemmMode::WGrad;         // M indexes sorted pair rows
  constexpr bool kAKMajor = kRows;
  constexpr bool kBKMajor = kMode == GemmMode::UpFwd || kMode == GemmMode::DownFwd;
  constexpr int kNB = kDual ? 2 : 1;
  constexpr int kATile = kBM * kPitch, kBTile = kBN * kPitch;
  constexpr int kTileBytes = 2 * (kATile + kNB * kBTile) * static_cast<int>(sizeof(Bits));
  constexpr int kRedBytes = kMode == GemmMode::ZBwd ? kBM * (kBN + 1) * 4 : 0;
  constexpr int kSmemBytes = kTileBytes > kRedBytes ? kTileBytes : kRedBytes;
  constexpr int kLineChunks = kBK / kVec;                  // chunks along k of a K-major line
  constexpr int kAC = kBM * kBK / kVec / kThreads;          // chunks per thread per A tile
  constexpr int kBC = kBN * kBK / kVec / kThreads;          // ... per B tile
  static_assert(kAC * kVec * kThreads == kBM * kBK && kBC * kVec * kThreads == kBN * kBK, "tile split");
  static_assert(kBM % kVec == 0 && kBN % kVec == 0 && kBK % kVec == 0, "chunking");

  ACCEL_STATIC_SMEM(unsigned char, smem, kSmemBytes);
  Bits* As = reinterpret_cast<Bits*>(smem);  // [2][kBM][kPitch]
  Bits* Bs = As + 2 * kATile;                // [2][kNB][kBN][kPitch]

  const int tid = threadIdx.x;

  // ---- which tile, which expert, which k range
  int expert, m0, n0, k_begin, k_end;
  if constexpr (kRows) {
    expert = p.block_expert[blockIdx.x];
    if (expert < 0) return;  // an unused row block (uniform over the CTA)
    m0 = blockIdx.x * kBM;
    n0 = blockIdx.y * kBN;
    k_begin = 0;
    k_end = p.K;
  } else {
    const int tiles_m = ceil_div(p.M, kBM), tiles_n = ceil_div(p.N, kBN);
    int tile = blockIdx.x;
    expert = tile / (tiles_m * tiles_n);
    tile -= expert * tiles_m * tiles_n;
    m0 = (tile / tiles_n) * kBM;
    n0 = (tile % tiles_n) * kBN;
    k_begin = p.expert_offsets[expert];
    k_end = p.expert_offsets[expert + 1];
  }
  const T* a_base = static_cast<const T*>(p.a.ptr) + expert * p.a.expert_stride;
  const T* b_base = static_cast<const T*>(p.b.ptr) + expert * p.b.expert_stride;

  // K-major lines are fixed for the whole k loop: resolve them once.
  const T* a_line[kAC];
  const T* b_line[kNB][kBC];
  if constexpr (kAKMajor) {
#pragma unroll
    for (int s = 0; s < kAC; ++s) {
      const int c = s * kThreads + tid;
      a_line[s] = line_ptr<T>(p.a, a_base, m0 + c / kLineChunks, p.sorted_pairs, p.top_k);
    }
  }
  if constexpr (kBKMajor) {
#pragma unroll
    for (int s = 0; s < kBC; ++s) {
      const int n = n0 + (s * kThreads + tid) / kLineChunks;
#pragma unroll
      for (int q = 0; q < kNB; ++q)
        b_line[q][s] = n < p.N ? b_base + static_cast<int64_t>(n + q * p.inter) * p.b.ld : nullptr;
    }
  }

  Chunk<T> ra[kAC];
  Chunk<T> rb[kNB][kBC];

  // global -> registers: the k-tile starting at k0
  auto load_tile = [&](int k0) {
#pragma unroll
    for (int s = 0; s < kAC; ++s) {
      const int c = s * kThreads + tid;
      if constexpr (kAKMajor) {
        load_chunk<T>(ra[s], a_line[s], k0 + (c % kLineChunks) * kVec, k_end, p.a.vec);
      } else {
        const int k = k0 + c / (kBM / kVec);
        const T* line = k < k_end ? line_ptr<T>(p.a, a_base, k, p.sorted_pairs, p.top_k) : nullptr;
        load_chunk<T>(ra[s], line, m0 + (c % (kBM / kVec)) * kVec, p.M, p.a.vec);
      }
    }
#pragma unroll
    for (int s = 0; s < kBC; ++s) {
      const int c = s * kThreads + tid;
      if constexpr (kBKMajor) {
#pragma unroll
        for (int q = 0; q < kNB; ++q)
          load_chunk<T>(rb[q][s], b_line[q][s], k0 + (c % kLineChunks) * kVec, k_end, p.b.vec);
      } else {
        const int k = k0 + c / (kBN / kVec);
        const T* line = k < k_end ? line_ptr<T>(p.b, b_base, k, p.sorted_pairs, p.top_k) : nullptr;
        load_chunk<T>(rb[0][s], line, n0 + (c % (kBN / kVec)) * kVec, p.N, p.b.vec);
      }
    }
  };

  // registers -> shared buffer `buf`, K-contiguous
  auto store_chunk = [&](Bits* tile, const Chunk<T>& ch, int c, bool k_major, int rows) {
    if (k_major) {
      Bits* dst = tile + (c / kLineChunks) * kPitch + (c % kLineChunks) * kVec;
      if constexpr (kTensorCores) {
        *reinterpret_cast<uint4*>(dst) = ch.v;  // 16-byte aligned: kPitch * 2 and kVec * 2 are multiples of 16
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) dst[i] = ch.e[i];
      }
    } else {
      const int kl = c / (rows / kVec), r0 = (c % (rows / kVec)) * kVec;
#pragma unroll
      for (int i = 0; i < kVec; ++i) tile[(r0 + i) * kPitch + kl] = ch.e[i];
    }
  };
  auto store_tile = [&](int buf) {
#pragma unroll
    for (int s = 0; s < kAC; ++s) store_chunk(As + buf * kATile, ra[s], s * kThreads + tid, kAKMajor, kBM);
#pragma unroll
    for (int q = 0; q < kNB; ++q)
#pragma unroll
      for (int s = 0; s < kBC; ++s)
        store_chunk(Bs + (buf * kNB + q) * kBTile, rb[q][s], s * kThreads + tid, kBKMajor, kBN);
  };

  // ---- accumulators and the per-k-tile compute
  const int lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // tensor cores: the warp's 32 x 32 sub-tile
  const int tx = tid % 16, ty = tid / 16;  // SIMT: rows ty + 16 i, cols tx + 16 j
  constexpr int kAcc = kTensorCores ? 2 * 4 * 4 : 4 * 4;
  float acc[kNB][kAcc];
#pragma unroll
  for (int q = 0; q < kNB; ++q)
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[q][i] = 0.f;

  auto compute = [&](int buf) {
    const Bits* as = As + buf * kATile;
    if constexpr (kTensorCores) {
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t af[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          ldmatrix_x4(af[mi], smem_u32(as + (wm * 32 + mi * 16 + lane % 16) * kPitch + kk + (lane / 16) * 8));
#pragma unroll
        for (int q = 0; q < kNB; ++q) {
          const Bits* bs = Bs + (buf * kNB + q) * kBTile;
#pragma unroll
          for (int nj = 0; nj < 2; ++nj) {
            uint32_t bf[4];  // b0, b1 of n8 tile 2 nj, then of n8 tile 2 nj + 1
            ldmatrix_x4(bf, smem_u32(bs + (wn * 32 + nj * 16 + lane % 8 + (lane / 16) * 8) * kPitch + kk +
                                     ((lane / 8) % 2) * 8));
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
              mma_m16n8k16<T>(&acc[q][(mi * 4 + 2 * nj) * 4], af[mi], bf[0], bf[1]);
              mma_m16n8k16<T>(&acc[q][(mi * 4 + 2 * nj + 1) * 4], af[mi], bf[2], bf[3]);
            }
          }
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        float a[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = as[(ty + 16 * i) * kPitch + k];
#pragma unroll
        for (int q = 0; q < kNB; ++q) {
          const Bits* bs = Bs + (buf * kNB + q) * kBTile;
          float b[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) b[j] = bs[(tx + 16 * j) * kPitch + k];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[q][i * 4 + j] = fmaf(a[i], b[j], acc[q][i * 4 + j]);
        }
      }
    }
  };

  // ---- main loop: one barrier per k-tile, the next tile's global loads overlap the compute
  const int n_k = k_end > k_begin ? ceil_div(k_end - k_begin, kBK) : 0;
  if (n_k > 0) {
    load_tile(k_begin);
    store_tile(0);
  }
  __syncthreads();
  for (int kt = 0; kt < n_k; ++kt) {
    const int buf = kt & 1;
    const bool more = kt + 1 < n_k;
    if (more) load_tile(k_begin + (kt + 1) * kBK);
    compute(buf);
    if (more) store_tile(buf ^ 1);
    __syncthreads();
  }

  // ---- epilogue: visit every accumulator element with its tile coordinates
  auto visit = [&](auto&& f) {
    if constexpr (kTensorCores) {
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int idx = (mi * 4 + ni) * 4 + c;
            f(wm * 32 + mi * 16 + lane / 4 + (c / 2) * 8, wn * 32 + ni * 8 + 2 * (lane % 4) + (c % 2), acc[0][idx],
              acc[kNB - 1][idx]);
          }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) f(ty + 16 * i, tx + 16 * j, acc[0][i * 4 + j], acc[kNB - 1][i * 4 + j]);
    }
  };

  const Activation act = p.act;
  if constexpr (kMode == GemmMode::UpFwd) {
    T* hbuf = static_cast<T*>(p.out);
    T* cache = static_cast<T*>(p.out2);
    const int inter = p.N;
    visit([&](int ml, int nl, float g, float u) {
      const int n = n0 + nl;
      if (n >= inter) return;
      const int row = m0 + ml;
      const int pair = p.sorted_pairs[row];
      const float h = pair >= 0 ? activation_forward(g, act) * u : 0.f;
      hbuf[static_cast<int64_t>(row) * inter + n] = from_float<T>(h);
      if (cache != nullptr && pair >= 0) {
        T* c = cache + static_cast<int64_t>(pair) * 2 * inter;
        c[n] = from_float<T>(g);
        c[inter + n] = from_float<T>(u);
      }
    });
  } else if constexpr (kMode == GemmMode::DownFwd || kMode == GemmMode::DxBwd) {
    float* y = static_cast<float*>(p.out);
    visit([&](int ml, int nl, float v, float) {
      const int n = n0 + nl;
      if (n >= p.N) return;
      const int pair = p.sorted_pairs[m0 + ml];
      if (pair < 0) return;
      if constexpr (kMode == GemmMode::DownFwd) v *= pair_weight<T>(p.weights, p.weights_float, pair);
      y[static_cast<int64_t>(pair) * p.N + n] = v;
    });
  } else if constexpr (kMode == GemmMode::ZBwd) {
    // z = dout . W2[e] for pair p; dh = w z; dg = dh u act'(g); du = dh act(g); dw_p = sum_i z_i h_i
    T* dgu = static_cast<T*>(p.out);
    const T* cache = static_cast<const T*>(p.cache);
    const int inter = p.N;
    float* red = reinterpret_cast<float*>(smem);  // [kBM][kBN + 1]; the tiles are dead after the loop's barrier
    visit([&](int ml, int nl, float z, float) {
      const int n = n0 + nl;
      const int row = m0 + ml;
      float part = 0.f;
      if (n < inter) {
        const int pair = p.sorted_pairs[row];
        T* d = dgu + static_cast<int64_t>(row) * 2 * inter;
        if (pair >= 0) {
          const T* c = cache + static_cast<int64_t>(pair) * 2 * inter;
          const float g = to_float(c[n]), u = to_float(c[inter + n]);
          const float a = activation_forward(g, act);
          const float dh = pair_weight<T>(p.weights, p.weights_float, pair) * z;
          d[n] = from_float<T>(dh * u * activation_grad(g, act));
          d[inter + n] = from_float<T>(dh * a);
          part = z * a * u;
        } else {
          d[n] = from_float<T>(0.f);
          d[inter + n] = from_float<T>(0.f);
        }
      }
      red[ml * (kBN + 1) + nl] = part;
    });
    __syncthreads();
    if (tid < kBM) {
      float s = 0.f;
#pragma unroll 8
      for (int j = 0; j < kBN; ++j) s += red[tid * (kBN + 1) + j];
      p.dw_part[static_cast<int64_t>(m0 + tid) * gridDim.y + blockIdx.y] = s;
    }
  } else {  // WGrad
    T* dw = static_cast<T*>(p.out) + static_cast<int64_t>(expert) * p.M * p.N;
    visit([&](int ml, int nl, float v, float) {
      const int m = m0 + ml, n = n0 + nl;
      if (m < p.M && n < p.N) dw[static_cast<int64_t>(m) * p.N + n] = from_float<T>(v);
    });
  }
}

template <typename T, GemmMode kMode>
cudaError_t launch(const GemmParams& p, cudaStream_t stream) {
  dim3 grid;
  if constexpr (kMode == GemmMode::WGrad) {
    grid = dim3(static_cast<unsigned>(ceil_div(p.M, kBM) * ceil_div(p.N, kBN) * p.experts));
  } else {
    grid = dim3(static_cast<unsigned>(p.n_blocks), static_cast<unsigned>(ceil_div(p.N, kBN)));
  }
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  auto kernel = &moe_gemm_kernel<T, kMode>;
  ACCEL_LAUNCH(kernel, grid, Cfg<T>::kThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace accel::fused_moe::cuda::gemm
