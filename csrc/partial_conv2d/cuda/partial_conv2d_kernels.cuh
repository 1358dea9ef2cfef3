// CUDA kernels of accel::partial_conv2d (see partial_conv2d.h for the formula); the launcher is
// partial_conv2d_cuda.cu, and tests/cpp/test_partial_conv2d_cuda_emu.cpp runs these kernels on the
// CPU emulator.
//
//  * conv3x3_kernel (the forward, and grad_x with the weights read transposed and flipped): a block
//    computes a tile of tx x 2*ty output pixels of one image (each thread two vertically adjacent
//    pixels) for COB output channels. Input channels go through shared memory a chunk at a time:
//    the chunk's tile plus a one-pixel halo (zero outside the image) and the chunk's weights for the
//    block's output channels, both in the accumulation type; the results are written straight into
//    the output through its strides (channels < Cp only: the others are the launcher's copy).
//  * wgrad_kernel + wgrad_sum_kernel (grad_weight, grad_bias): a block owns a group of (co, ci)
//    pairs (one thread per pair and tile row lane) and a fixed share of the pixel tiles; per tile it
//    stages grad_out and the input (with its halo) in shared memory, each thread slides a 3x3
//    window along its rows accumulating the 9 taps (and the grad_out sum for grad_bias), the lanes
//    are added in shared memory, and the block writes its partial sums. The second kernel adds the
//    partial sums of the shares in a fixed order: deterministic, no atomics.
// Every global offset is computed in 64 bits; the input, grad_out and output tensors are read and
// written through their strides.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "common/cuda_portable.h"

namespace accel::partial_conv2d::cuda {

// Element (b, c, y, x) of a 4-D tensor at p + b*b_ + c*c + y*h + x*w (in elements).
struct Strides {
  int64_t b, c, h, w;
};

// Whether a pixel's channels lie closer together than a row's pixels (channels_last): the staging
// loops then walk the channels fastest, so that neighbouring threads read neighbouring addresses.
inline bool channel_fastest(const Strides& s) { return (s.c < 0 ? -s.c : s.c) < (s.w < 0 ? -s.w : s.w); }

// dst[c * dst_plane + r * cols + col] = src(c, y0 + r, x0 + col) as acc_t, zero outside the image,
// for c < channels, r < rows, col < cols, where src(c, y, x) = src[c * s.c + y * s.h + x * s.w]: a
// block's threads stage a tile together, walking the channels fastest when they lie closest.
template <typename scalar_t, typename acc_t>
__device__ inline void stage_tile(const scalar_t* src, const Strides& s, bool by_channel, int channels, int rows,
                                  int cols, int64_t y0, int64_t x0, int64_t H, int64_t W, acc_t* dst, int dst_plane,
                                  int tid, int nthreads) {
  const int n = channels * rows * cols;
  for (int i = tid; i < n; i += nthreads) {
    int c, r, col;
    if (by_channel) {
      c = i % channels;
      r = i / channels / cols;
      col = i / channels % cols;
    } else {
      col = i % cols;
      r = i / cols % rows;
      c = i / (cols * rows);
    }
    const int64_t y = y0 + r, x = x0 + col;
    acc_t v = acc_t(0);
    if (y >= 0 && y < H && x >= 0 && x < W) v = static_cast<acc_t>(src[c * s.c + y * s.h + x * s.w]);
    dst[c * dst_plane + r * cols + col] = v;
  }
}

// ------------------------------------------------------------------ the convolution

struct ConvParams {
  const void* in;      // (B, >= cp, H, W), strides is
  Strides is;
  void* out;           // (B, >= cp, H, W), strides os; channels [0, cp) written
  Strides os;
  const void* weight;  // (cp, cp, 3, 3) contiguous
  const void* bias;    // (cp,) or null
  int64_t batch, height, width, cp;
  bool transposed;     // read w'[co][ci][k] = w[ci][co][8 - k] (grad_x)
  bool in_channel_fastest;
};

// Input channels staged per pass: the same bytes of shared memory for float and double.
template <typename acc_t>
constexpr int conv_ci_chunk() {
  return sizeof(acc_t) >= 8 ? 4 : 8;
}

struct ConvPlan {
  int tx, ty;  // block (tx, ty) threads; a tile is tx columns by 2 * ty rows
  int cob;     // output channels per block: 4, 8 or 16
  int64_t tiles_x, tiles_y, co_groups;
  size_t smem;  // dynamic shared memory bytes
  int64_t blocks(int64_t batch) const { return batch * tiles_x * tiles_y; }
};

inline int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

template <typename acc_t>
ConvPlan plan_conv(int64_t height, int64_t width, int64_t cp) {
  ConvPlan pl{};
  // tiles about as wide as the image (narrow late stages waste fewer threads), 32 to 256 threads
  pl.tx = width <= 8 ? 8 : width <= 16 ? 16 : 32;
  pl.ty = std::max(32 / pl.tx, pow2_at_least((height + 1) / 2, 256 / pl.tx));
  // the channel block with the least padded work, counting each group's staging as two channels
  int64_t best = -1;
  for (const int cob : {16, 8, 4}) {
    const int64_t cost = (cp + cob - 1) / cob * (cob + 2);
    if (best < 0 || cost < best) {
      best = cost;
      pl.cob = cob;
    }
  }
  pl.tiles_x = (width + pl.tx - 1) / pl.tx;
  pl.tiles_y = (height + 2 * pl.ty - 1) / (2 * pl.ty);
  pl.co_groups = (cp + pl.cob - 1) / pl.cob;
  const int ci = conv_ci_chunk<acc_t>();
  pl.smem = sizeof(acc_t) * static_cast<size_t>(ci * (2 * pl.ty + 2) * (pl.tx + 2) + ci * 9 * pl.cob);
  return pl;
}

// grid (B * tiles_y * tiles_x, co_groups), block (tx, ty), pl.smem bytes of dynamic shared memory.
template <typename scalar_t, typename acc_t, int COB>
__global__ void __launch_bounds__(256) conv3x3_kernel(ConvParams p, int64_t tiles_x, int64_t tiles_y) {
  constexpr int CI = conv_ci_chunk<acc_t>();
  ACCEL_DYNAMIC_SMEM(unsigned char, smem_raw);
  const int tx = static_cast<int>(blockDim.x), ty = static_cast<int>(blockDim.y);
  const int pw = tx + 2, ph = 2 * ty + 2, plane = ph * pw;
  acc_t* xs = reinterpret_cast<acc_t*>(smem_raw);  // [CI][ph][pw]: input rows y0 - 1 .. y0 + 2 ty
  acc_t* ws = xs + CI * plane;                      // [CI][9][COB]
  const int tid = static_cast<int>(threadIdx.y) * tx + static_cast<int>(threadIdx.x), nthreads = tx * ty;

  int64_t blk = blockIdx.x;
  const int64_t tile_x = blk % tiles_x;
  blk /= tiles_x;
  const int64_t tile_y = blk % tiles_y, b = blk / tiles_y;
  const int64_t x0 = tile_x * tx, y0 = tile_y * 2 * ty, co0 = static_cast<int64_t>(blockIdx.y) * COB;
  const int64_t H = p.height, W = p.width, cp = p.cp;
  const scalar_t* in = static_cast<const scalar_t*>(p.in) + b * p.is.b;
  const scalar_t* w = static_cast<const scalar_t*>(p.weight);
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);

  acc_t acc[2][COB];
#pragma unroll
  for (int j = 0; j < COB; ++j) {
    const acc_t b0 = bias != nullptr && co0 + j < cp ? static_cast<acc_t>(bias[co0 + j]) : acc_t(0);
    acc[0][j] = b0;
    acc[1][j] = b0;
  }

  for (int64_t ci0 = 0; ci0 < cp; ci0 += CI) {
    const int cn = static_cast<int>(cp - ci0 < CI ? cp - ci0 : CI);
    __syncthreads();  // every thread is done with the previous chunk
    stage_tile(in + ci0 * p.is.c, p.is, p.in_channel_fastest, cn, ph, pw, y0 - 1, x0 - 1, H, W, xs, plane, tid,
               nthreads);
    const int n_w = cn * 9 * COB;
    for (int i = tid; i < n_w; i += nthreads) {  // i = (c * 9 + k) * COB + j
      const int j = i % COB, k = (i / COB) % 9, c = i / (9 * COB);
      const int64_t co = co0 + j, ci = ci0 + c;
      acc_t v = acc_t(0);
      if (co < cp) v = static_cast<acc_t>(p.transposed ? w[(ci * cp + co) * 9 + 8 - k] : w[(co * cp + ci) * 9 + k]);
      ws[i] = v;
    }
    __syncthreads();
    for (int c = 0; c < cn; ++c) {
      const acc_t* src = xs + c * plane + 2 * static_cast<int>(threadIdx.y) * pw + static_cast<int>(threadIdx.x);
      acc_t v[4][3];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) v[r][kw] = src[r * pw + kw];
      }
      const acc_t* wc = ws + c * 9 * COB;
#pragma unroll
      for (int k = 0; k < 9; ++k) {
        const int kh = k / 3, kw = k % 3;
#pragma unroll
        for (int j = 0; j < COB; ++j) {
          const acc_t wv = wc[k * COB + j];
          acc[0][j] += wv * v[kh][kw];
          acc[1][j] += wv * v[kh + 1][kw];
        }
      }
    }
  }

  const int64_t x = x0 + threadIdx.x;
  if (x >= W) return;
  scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.os.b + x * p.os.w;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t y = y0 + 2 * static_cast<int64_t>(threadIdx.y) + r;
    if (y >= H) break;
#pragma unroll
    for (int j = 0; j < COB; ++j) {
      if (co0 + j < cp) out[(co0 + j) * p.os.c + y * p.os.h] = static_cast<scalar_t>(acc[r][j]);
    }
  }
}

// Launches the convolution planned by pl (plan_conv of p's sizes) on `stream`.
template <typename scalar_t, typename acc_t, typename Stream>
void launch_conv(const ConvParams& p, const ConvPlan& pl, Stream stream) {
  if (p.batch == 0 || p.height == 0 || p.width == 0 || p.cp == 0) return;
  const dim3 grid(static_cast<unsigned>(pl.blocks(p.batch)), static_cast<unsigned>(pl.co_groups));
  const dim3 block(static_cast<unsigned>(pl.tx), static_cast<unsigned>(pl.ty));
  if (pl.cob == 16) {
    auto* k = &conv3x3_kernel<scalar_t, acc_t, 16>;
    ACCEL_LAUNCH(k, grid, block, pl.smem, stream, p, pl.tiles_x, pl.tiles_y);
  } else if (pl.cob == 8) {
    auto* k = &conv3x3_kernel<scalar_t, acc_t, 8>;
    ACCEL_LAUNCH(k, grid, block, pl.smem, stream, p, pl.tiles_x, pl.tiles_y);
  } else {
    auto* k = &conv3x3_kernel<scalar_t, acc_t, 4>;
    ACCEL_LAUNCH(k, grid, block, pl.smem, stream, p, pl.tiles_x, pl.tiles_y);
  }
}

// ------------------------------------------------------------------ grad_weight and grad_bias

struct WgradParams {
  const void* x;  // (B, >= cp, H, W), strides xs
  Strides xs;
  const void* g;  // grad_out, (B, >= cp, H, W), strides gs
  Strides gs;
  int64_t batch, height, width, cp;
  bool x_channel_fastest, g_channel_fastest;
};

constexpr int kWgradRows = 8;        // rows of a pixel tile
constexpr int kWgradMaxGroup = 16;   // channels per group (co and ci): at most 256 pairs a block
constexpr int kWgradThreads = 256;

// Columns of a pixel tile: the same shared memory for float and double.
template <typename acc_t>
constexpr int wgrad_cols() {
  return sizeof(acc_t) >= 8 ? 16 : 32;
}
template <typename acc_t>
constexpr int wgrad_x_plane() {  // (rows + 2) x (cols + 2), odd: the ci of a warp fall in different banks
  return ((kWgradRows + 2) * (wgrad_cols<acc_t>() + 2)) | 1;
}
template <typename acc_t>
constexpr int wgrad_g_plane() {
  return (kWgradRows * wgrad_cols<acc_t>()) | 1;
}

struct WgradPlan {
  int cog, cig, lanes;  // block: cog * cig * lanes threads, lane l takes tile rows l, l + lanes, ...
  int64_t tiles_x, tiles_y, tiles, co_groups, ci_groups;
  int64_t splits;       // blocks sharing the tiles of one (co group, ci group): tile t goes to t % splits
  size_t smem;
  int threads() const { return cog * cig * lanes; }
};

// The partial sums: (splits, cp * cp * 9 + cp) in acc_t, grad_w's elements then grad_b's.
constexpr int64_t wgrad_row(int64_t cp) { return cp * cp * 9 + cp; }

// target_blocks: how many blocks keep the GPU busy (a few per SM); the splits follow from it.
template <typename acc_t>
WgradPlan plan_wgrad(int64_t batch, int64_t height, int64_t width, int64_t cp, int64_t target_blocks) {
  WgradPlan pl{};
  const int64_t groups = (cp + kWgradMaxGroup - 1) / kWgradMaxGroup;
  pl.cog = pl.cig = static_cast<int>((cp + groups - 1) / groups);  // balanced groups
  pl.co_groups = pl.ci_groups = (cp + pl.cog - 1) / pl.cog;
  pl.lanes = std::clamp(kWgradThreads / (pl.cog * pl.cig), 1, kWgradRows);
  constexpr int cols = wgrad_cols<acc_t>();
  pl.tiles_x = (width + cols - 1) / cols;
  pl.tiles_y = (height + kWgradRows - 1) / kWgradRows;
  pl.tiles = batch * pl.tiles_x * pl.tiles_y;
  const int64_t per_split = pl.co_groups * pl.ci_groups;
  pl.splits = std::clamp<int64_t>((target_blocks + per_split - 1) / per_split, 1, std::max<int64_t>(pl.tiles, 1));
  const int64_t staging = int64_t(pl.cig) * wgrad_x_plane<acc_t>() + int64_t(pl.cog) * wgrad_g_plane<acc_t>();
  const int64_t reduce = int64_t(pl.threads()) * 10;
  pl.smem = sizeof(acc_t) * static_cast<size_t>(std::max(staging, reduce));
  return pl;
}

// grid (splits, co_groups, ci_groups), block threads(); writes partial[blockIdx.x][...] for the
// block's pairs (and grad_b's entries from the blocks of ci group 0).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWgradThreads) wgrad_kernel(WgradParams p, WgradPlan pl, acc_t* partial) {
  constexpr int R = kWgradRows, TW = wgrad_cols<acc_t>(), XW = TW + 2;
  constexpr int XPLANE = wgrad_x_plane<acc_t>(), GPLANE = wgrad_g_plane<acc_t>();
  ACCEL_DYNAMIC_SMEM(unsigned char, smem_raw);
  acc_t* xsm = reinterpret_cast<acc_t*>(smem_raw);  // [cig] planes of [R + 2][XW]: rows y0 - 1 ..
  acc_t* gsm = xsm + pl.cig * XPLANE;               // [cog] planes of [R][TW]
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int pairs = pl.cog * pl.cig;
  const int ci_l = tid % pl.cig, co_l = (tid / pl.cig) % pl.cog, lane = tid / pairs;
  const int64_t H = p.height, W = p.width, cp = p.cp;
  const int64_t co0 = static_cast<int64_t>(blockIdx.y) * pl.cog, ci0 = static_cast<int64_t>(blockIdx.z) * pl.cig;
  const int con = static_cast<int>(cp - co0 < pl.cog ? cp - co0 : pl.cog);
  const int cin = static_cast<int>(cp - ci0 < pl.cig ? cp - ci0 : pl.cig);
  const bool active = co_l < con && ci_l < cin;
  const scalar_t* xg = static_cast<const scalar_t*>(p.x);
  const scalar_t* gg = static_cast<const scalar_t*>(p.g);

  acc_t acc[9], gsum = acc_t(0);
#pragma unroll
  for (int k = 0; k < 9; ++k) acc[k] = acc_t(0);

  for (int64_t t = blockIdx.x; t < pl.tiles; t += gridDim.x) {
    const int64_t tile_x = t % pl.tiles_x, tile_y = (t / pl.tiles_x) % pl.tiles_y, b = t / (pl.tiles_x * pl.tiles_y);
    const int64_t x0 = tile_x * TW, y0 = tile_y * R;
    __syncthreads();  // every thread is done with the previous tile
    stage_tile(xg + b * p.xs.b + ci0 * p.xs.c, p.xs, p.x_channel_fastest, cin, R + 2, XW, y0 - 1, x0 - 1, H, W, xsm,
               XPLANE, tid, nthreads);
    stage_tile(gg + b * p.gs.b + co0 * p.gs.c, p.gs, p.g_channel_fastest, con, R, TW, y0, x0, H, W, gsm, GPLANE, tid,
               nthreads);
    __syncthreads();
    if (!active) continue;
    const int ncols = static_cast<int>(W - x0 < TW ? W - x0 : TW);
    for (int r = lane; r < R && y0 + r < H; r += pl.lanes) {
      const acc_t* xr = xsm + ci_l * XPLANE + r * XW;  // padded rows r, r + 1, r + 2: input rows y - 1 .. y + 1
      const acc_t* gr = gsm + co_l * GPLANE + r * TW;
      acc_t win[3][3];
#pragma unroll
      for (int kh = 0; kh < 3; ++kh) {
        win[kh][1] = xr[kh * XW];
        win[kh][2] = xr[kh * XW + 1];
      }
      for (int col = 0; col < ncols; ++col) {
        const acc_t gv = gr[col];
#pragma unroll
        for (int kh = 0; kh < 3; ++kh) {
          win[kh][0] = win[kh][1];
          win[kh][1] = win[kh][2];
          win[kh][2] = xr[kh * XW + col + 2];
#pragma unroll
          for (int kw = 0; kw < 3; ++kw) acc[kh * 3 + kw] += gv * win[kh][kw];
        }
        gsum += gv;
      }
    }
  }

  // the lanes' sums, added in lane order by lane 0
  __syncthreads();
  acc_t* red = xsm;  // [threads][10]
#pragma unroll
  for (int k = 0; k < 9; ++k) red[tid * 10 + k] = acc[k];
  red[tid * 10 + 9] = gsum;
  __syncthreads();
  if (lane != 0 || !active) return;
  acc_t s[10];
#pragma unroll
  for (int k = 0; k < 10; ++k) s[k] = red[tid * 10 + k];
  for (int l = 1; l < pl.lanes; ++l) {
#pragma unroll
    for (int k = 0; k < 10; ++k) s[k] += red[(l * pairs + tid) * 10 + k];
  }
  acc_t* out = partial + static_cast<int64_t>(blockIdx.x) * wgrad_row(cp);
  const int64_t co = co0 + co_l, ci = ci0 + ci_l;
#pragma unroll
  for (int k = 0; k < 9; ++k) out[(co * cp + ci) * 9 + k] = s[k];
  if (ci == 0) out[cp * cp * 9 + co] = s[9];
}

// grad_w[j] (j < cp*cp*9, contiguous) and grad_b[j - cp*cp*9]: the splits' partial sums in order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256)
wgrad_sum_kernel(const acc_t* partial, int64_t splits, int64_t cp, scalar_t* grad_w, scalar_t* grad_b) {
  const int64_t n = wgrad_row(cp), nw = cp * cp * 9;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  if (j < nw ? grad_w == nullptr : grad_b == nullptr) return;
  acc_t s = acc_t(0);
  for (int64_t i = 0; i < splits; ++i) s += partial[i * n + j];
  if (j < nw) {
    grad_w[j] = static_cast<scalar_t>(s);
  } else {
    grad_b[j - nw] = static_cast<scalar_t>(s);
  }
}

// Launches both kernels: partial holds pl.splits * wgrad_row(cp) elements; grad_w (cp*cp*9,
// contiguous) and grad_b (cp) may each be null. Nothing to sum over (no pixels) is the caller's case.
template <typename scalar_t, typename acc_t, typename Stream>
void launch_wgrad(const WgradParams& p, const WgradPlan& pl, acc_t* partial, scalar_t* grad_w, scalar_t* grad_b,
                  Stream stream) {
  if (pl.tiles == 0 || (grad_w == nullptr && grad_b == nullptr)) return;
  const dim3 grid(static_cast<unsigned>(pl.splits), static_cast<unsigned>(pl.co_groups),
                  static_cast<unsigned>(pl.ci_groups));
  auto* k = &wgrad_kernel<scalar_t, acc_t>;
  ACCEL_LAUNCH(k, grid, static_cast<unsigned>(pl.threads()), pl.smem, stream, p, pl, partial);
  const int64_t n = wgrad_row(p.cp);
  auto* sum = &wgrad_sum_kernel<scalar_t, acc_t>;
  ACCEL_LAUNCH(sum, static_cast<unsigned>((n + 255) / 256), 256u, 0, stream, partial, pl.splits, p.cp, grad_w,
               grad_b);
}

}  // namespace accel::partial_conv2d::cuda
