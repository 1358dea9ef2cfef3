// CUDA reductions over partial_conv2d's untouched channels c >= Cp, one pair of sums per (b, c)
// plane: PAT_ch's statistics (kStats: sums of d = x - k and d^2, k the plane's first value, so the
// sum of squares does not cancel when |mean| >> std) and the gradients of the per-plane scale and
// shift (sums of grad_out * x and grad_out). The launcher is partial_conv2d_stats.cu;
// tests/cpp/test_partial_conv2d_cuda_emu.cpp runs these kernels on the CPU emulator.
//
//  * sums_kernel: a 32 x 8 block. With the channels closest in memory (channels_last) the 32 lanes
//    are 32 neighbouring channels and the 8 rows stride over the pixels (coalesced); otherwise the
//    block owns one plane and its 256 threads stride over the pixels. blockIdx.y is a share of the
//    pixels; each block writes its partial sums, added in shares' order by
//  * sums_finish_kernel, which also turns the statistics' sums into mean and unbiased std.
// Deterministic: no atomics.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/cuda_portable.h"
#include "partial_conv2d/cuda/partial_conv2d_kernels.cuh"

namespace accel::partial_conv2d::cuda {

constexpr int kSumsLanes = 32, kSumsRows = 8;
constexpr int64_t kSumsMinPixelsPerShare = 1024;  // a share sums at least this many pixels

struct SumsParams {
  const void* a;  // x (kStats) or grad_out
  Strides as;
  const void* b;  // x (the gradients), null for the statistics
  Strides bs;
  int64_t batch, cp, cu, pixels, width;
  bool channel_lanes;
};

struct SumsPlan {
  int64_t blocks_x, shares;
};

inline SumsPlan plan_sums(const SumsParams& p, int64_t target_blocks) {
  const int64_t bx = p.channel_lanes ? p.batch * ((p.cu + kSumsLanes - 1) / kSumsLanes) : p.batch * p.cu;
  int64_t shares = bx > 0 ? (target_blocks + bx - 1) / bx : 1;
  const int64_t most = (p.pixels + kSumsMinPixelsPerShare - 1) / kSumsMinPixelsPerShare;
  shares = std::max<int64_t>(1, std::min<int64_t>({shares, most, 65535}));
  return {bx, shares};
}

template <bool kStats, typename scalar_t, typename acc_t>
__device__ inline void sums_at(const SumsParams& p, const scalar_t* a, const scalar_t* b, int64_t i, acc_t k,
                               acc_t& s1, acc_t& s2) {
  const int64_t y = i / p.width, x = i % p.width;
  const acc_t v = static_cast<acc_t>(a[y * p.as.h + x * p.as.w]);
  if (kStats) {
    const acc_t d = v - k;
    s1 += d;
    s2 += d * d;
  } else {
    s1 += v * static_cast<acc_t>(b[y * p.bs.h + x * p.bs.w]);
    s2 += v;
  }
}

// partial[((share * B + b) * cu + c - cp) * 2 + {0, 1}] = the share's two sums of plane (b, c).
template <bool kStats, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSumsLanes* kSumsRows) sums_kernel(SumsParams p, int64_t shares, acc_t* partial) {
  ACCEL_STATIC_SMEM(acc_t, red, 2 * kSumsLanes * kSumsRows);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kSumsLanes + tx;
  const int64_t share = blockIdx.y;
  const int64_t i0 = p.pixels * share / shares, i1 = p.pixels * (share + 1) / shares;
  const scalar_t* A = static_cast<const scalar_t*>(p.a);
  const scalar_t* Bt = static_cast<const scalar_t*>(p.b);
  acc_t s1 = acc_t(0), s2 = acc_t(0);
  int64_t bi, c;
  bool active;
  if (p.channel_lanes) {
    const int64_t blocks_c = (p.cu + kSumsLanes - 1) / kSumsLanes;
    bi = blockIdx.x / blocks_c;
    c = p.cp + (blockIdx.x % blocks_c) * kSumsLanes + tx;
    active = c < p.cp + p.cu;
    if (active) {
      const scalar_t* a = A + bi * p.as.b + c * p.as.c;
      const scalar_t* b = kStats ? nullptr : Bt + bi * p.bs.b + c * p.bs.c;
      const acc_t k = kStats ? static_cast<acc_t>(a[0]) : acc_t(0);
      for (int64_t i = i0 + ty; i < i1; i += kSumsRows) sums_at<kStats>(p, a, b, i, k, s1, s2);
    }
  } else {
    bi = blockIdx.x / p.cu;
    c = p.cp + blockIdx.x % p.cu;
    active = true;
    const scalar_t* a = A + bi * p.as.b + c * p.as.c;
    const scalar_t* b = kStats ? nullptr : Bt + bi * p.bs.b + c * p.bs.c;
    const acc_t k = kStats ? static_cast<acc_t>(a[0]) : acc_t(0);
    for (int64_t i = i0 + tid; i < i1; i += kSumsLanes * kSumsRows) sums_at<kStats>(p, a, b, i, k, s1, s2);
  }
  red[2 * tid] = s1;
  red[2 * tid + 1] = s2;
  __syncthreads();
  // channel lanes: lane tx adds its column's 8 rows; plane: thread 0 adds all 256, in order
  if (p.channel_lanes ? (ty != 0 || !active) : tid != 0) return;
  const int n = p.channel_lanes ? kSumsRows : kSumsLanes * kSumsRows;
  const int step = p.channel_lanes ? kSumsLanes : 1;
  acc_t t1 = acc_t(0), t2 = acc_t(0);
  for (int r = 0; r < n; ++r) {
    t1 += red[2 * (r * step + tx)];
    t2 += red[2 * (r * step + tx) + 1];
  }
  acc_t* out = partial + ((share * p.batch + bi) * p.cu + (c - p.cp)) * 2;
  out[0] = t1;
  out[1] = t2;
}

// The shares' sums added in order. kStats: mean[j] = k + S1 / N, std[j] = sqrt((S2 - S1^2 / N) /
// (N - 1)) (NaN for N = 1, as torch.std) in out_t; otherwise sum_gx[j] = S1, sum_g[j] = S2.
template <bool kStats, typename scalar_t, typename acc_t, typename out_t>
__global__ void __launch_bounds__(256)
sums_finish_kernel(SumsParams p, int64_t shares, const acc_t* partial, out_t* out1, out_t* out2) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.batch * p.cu) return;
  acc_t s1 = acc_t(0), s2 = acc_t(0);
  for (int64_t s = 0; s < shares; ++s) {
    s1 += partial[(s * p.batch * p.cu + j) * 2];
    s2 += partial[(s * p.batch * p.cu + j) * 2 + 1];
  }
  if (kStats) {
    const int64_t bi = j / p.cu, c = p.cp + j % p.cu;
    const acc_t k = static_cast<acc_t>(static_cast<const scalar_t*>(p.a)[bi * p.as.b + c * p.as.c]);
    const acc_t n = static_cast<acc_t>(p.pixels);
    acc_t m2 = s2 - s1 * s1 / n;
    m2 = m2 > acc_t(0) ? m2 : acc_t(0);
    s1 = k + s1 / n;
    s2 = sqrt(m2 / (n - acc_t(1)));
  }
  out1[j] = static_cast<out_t>(s1);
  out2[j] = static_cast<out_t>(s2);
}

// Both kernels: partial holds pl.shares * B * cu * 2 elements; out1/out2 (B * cu each).
template <bool kStats, typename scalar_t, typename acc_t, typename out_t, typename Stream>
void launch_sums(const SumsParams& p, const SumsPlan& pl, acc_t* partial, out_t* out1, out_t* out2, Stream stream) {
  if (p.batch * p.cu == 0 || p.pixels == 0) return;
  const dim3 grid(static_cast<unsigned>(pl.blocks_x), static_cast<unsigned>(pl.shares));
  const dim3 block(kSumsLanes, kSumsRows);
  auto* k = &sums_kernel<kStats, scalar_t, acc_t>;
  ACCEL_LAUNCH(k, grid, block, 0, stream, p, pl.shares, partial);
  auto* fin = &sums_finish_kernel<kStats, scalar_t, acc_t, out_t>;
  ACCEL_LAUNCH(fin, static_cast<unsigned>((p.batch * p.cu + 255) / 256), 256u, 0, stream, p, pl.shares, partial,
               out1, out2);
}

}  // namespace accel::partial_conv2d::cuda
