// CUDA kernels of accel::streaming_conv1d (see streaming_conv1d.h for the formula); the launcher is
// streaming_conv1d_cuda.cu, and tests/cpp/test_streaming_conv1d_cuda_emu.cpp runs these kernels on
// the CPU emulator.
//
// u[ci, j] is read where it lies (the state row for j < L_s, the chunk after), never concatenated.
//  * depthwise_kernel (one input and output channel per group, short chunks: the decode step): one
//    thread per (b, c) computes the row's outputs, then advances its state row in place.
//  * outputs_kernel + advance_kernel (the rest): one thread per output; then, once every output has
//    read the old state (the next launch on the stream), one thread per state row advances it.
// On the GPU nothing is read back to the host: a row whose slot lies outside [0, S) is padding.
#pragma once

#include <cstdint>

#include "common/activation.h"
#include "common/cuda_portable.h"

namespace accel::streaming_conv1d::cuda {

struct Params {
  const void* x;        // (B, C_in, h), strides x_sb, x_sc, x_st
  void* state;          // (S, C_in, L_s) contiguous
  const void* weight;   // (C_out, C_in / groups, K) contiguous
  const void* bias;     // (C_out,) or null
  const int32_t* slots; // (B,) or null (row b uses slot b)
  void* out;            // (B, C_out, h) contiguous
  int64_t batch, c_in, c_out, chunk, kernel, dilation, c_in_per_group, c_out_per_group, n_slots, state_len;
  int64_t x_sb, x_sc, x_st;
  Activation act;
};

__device__ inline int64_t slot_of(const Params& p, int64_t b) {
  if (p.slots == nullptr) return b;
  const int64_t s = p.slots[b];
  return s >= 0 && s < p.n_slots ? s : -1;
}

template <typename scalar_t, typename acc_t>
__device__ inline acc_t conv_at(const Params& p, int64_t b, int64_t s, int64_t co, int64_t t) {
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* state = static_cast<const scalar_t*>(p.state);
  const scalar_t* w = static_cast<const scalar_t*>(p.weight) + co * p.c_in_per_group * p.kernel;
  const int64_t ci0 = (co / p.c_out_per_group) * p.c_in_per_group, ls = p.state_len;
  acc_t z = p.bias ? static_cast<acc_t>(static_cast<const scalar_t*>(p.bias)[co]) : acc_t(0);
  for (int64_t ci = 0; ci < p.c_in_per_group; ++ci) {
    const scalar_t* srow = state + (s * p.c_in + ci0 + ci) * ls;
    const scalar_t* xrow = x + b * p.x_sb + (ci0 + ci) * p.x_sc;
    for (int64_t k = 0; k < p.kernel; ++k) {
      const int64_t j = ls + t - (p.kernel - 1 - k) * p.dilation;
      const acc_t v = static_cast<acc_t>(j < ls ? srow[j] : xrow[(j - ls) * p.x_st]);
      z += static_cast<acc_t>(w[ci * p.kernel + k]) * v;
    }
  }
  return z;
}

// The state row (s, c) advanced by h samples, in place (front to back, so each read precedes the
// write over it).
template <typename scalar_t>
__device__ inline void advance_row(const Params& p, int64_t b, int64_t s, int64_t c) {
  scalar_t* row = static_cast<scalar_t*>(p.state) + (s * p.c_in + c) * p.state_len;
  const scalar_t* xrow = static_cast<const scalar_t*>(p.x) + b * p.x_sb + c * p.x_sc;
  const int64_t ls = p.state_len, h = p.chunk;
  for (int64_t j = 0; j < ls; ++j) row[j] = j + h < ls ? row[j + h] : xrow[(j + h - ls) * p.x_st];
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256) depthwise_kernel(Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.c_in) return;
  const int64_t c = i % p.c_in, b = i / p.c_in, s = slot_of(p, b);
  scalar_t* y = static_cast<scalar_t*>(p.out) + (b * p.c_out + c) * p.chunk;
  for (int64_t t = 0; t < p.chunk; ++t) {
    y[t] = s < 0 ? scalar_t(0) : static_cast<scalar_t>(activation_forward(conv_at<scalar_t, acc_t>(p, b, s, c, t), p.act));
  }
  if (s >= 0) advance_row<scalar_t>(p, b, s, c);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256) outputs_kernel(Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.c_out * p.chunk) return;
  const int64_t t = i % p.chunk, co = (i / p.chunk) % p.c_out, b = i / (p.chunk * p.c_out), s = slot_of(p, b);
  static_cast<scalar_t*>(p.out)[i] =
      s < 0 ? scalar_t(0) : static_cast<scalar_t>(activation_forward(conv_at<scalar_t, acc_t>(p, b, s, co, t), p.act));
}

template <typename scalar_t>
__global__ void __launch_bounds__(256) advance_kernel(Params p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.c_in) return;
  const int64_t c = i % p.c_in, b = i / p.c_in, s = slot_of(p, b);
  if (s >= 0) advance_row<scalar_t>(p, b, s, c);
}

constexpr int kThreads = 256;
// Depthwise chunks up to this length run fused, one thread per row; longer ones spread their
// outputs over threads.
constexpr int64_t kFusedMaxChunk = 32;

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// Launches the kernels for p on `stream` (none when there is nothing to do).
template <typename scalar_t, typename acc_t, typename Stream>
void launch(const Params& p, Stream stream) {
  if (p.chunk == 0) return;  // no output, and the state stays as it is
  const int64_t rows = p.batch * p.c_in, outputs = p.batch * p.c_out * p.chunk;
  auto* fused = &depthwise_kernel<scalar_t, acc_t>;
  auto* per_output = &outputs_kernel<scalar_t, acc_t>;
  auto* advance = &advance_kernel<scalar_t>;
  if (p.c_in_per_group == 1 && p.c_out_per_group == 1 && p.chunk <= kFusedMaxChunk) {
    if (rows > 0) ACCEL_LAUNCH(fused, blocks_for(rows), kThreads, 0, stream, p);
    return;
  }
  if (outputs > 0) ACCEL_LAUNCH(per_output, blocks_for(outputs), kThreads, 0, stream, p);
  if (rows > 0 && p.chunk > 0 && p.state_len > 0) {
    ACCEL_LAUNCH(advance, blocks_for(rows), kThreads, 0, stream, p);
  }
}

}  // namespace accel::streaming_conv1d::cuda
