// CUDA forward of accel::dilated_conv1d, and the direct-convolution launcher that the backward
// (dilated_conv1d_backward_cuda.cu) reuses for the activation gradient and for grad_x.
//
// One block computes a tile of `blockDim.x * kOutputsPerThread` outputs of one (b, co) row; thread
// i owns outputs t0 + i + j * blockDim.x, so every load and store of a warp is coalesced along t.
// The weights of `co` go to shared memory (as the accumulation type) when they fit. For depthwise
// convolutions (C_in/groups == 1, the TCN case, memory bound) the input window of the tile,
// [t0 - pad_left, t0 + tile - pad_left + (K-1)*dilation), is staged in shared memory once with
// coalesced loads, so that the K taps read shared memory instead of issuing K global loads per
// output. The epilogue fuses bias, activation, residual and the cast to the output dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>

#include "common/activation.h"
#include "dilated_conv1d/cuda/dilated_conv1d_cuda.h"
#include "dilated_conv1d/dilated_conv1d.h"

namespace accel::dilated_conv1d::cuda {
namespace {

constexpr int kOutputsPerThread = 4;
constexpr int kMaxThreads = 256;
// Weights are staged (as acc_t) up to this size; beyond it every thread reads the same weight
// address from global memory, which the L1 broadcasts anyway.
constexpr int64_t kMaxWeightSmemBytes = 16 * 1024;
// Default dynamic shared memory limit that needs no opt-in, on every architecture we build for.
constexpr int64_t kMaxSmemBytes = 48 * 1024;
// Row lengths, output lengths and the receptive field are kept below this so that every input
// position t + k*dilation - pad_left (with pad_left clamped, see below) fits in an int.
constexpr int64_t kMaxRowExtent = int64_t(1) << 29;

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
dilated_conv1d_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                      const scalar_t* __restrict__ bias, const scalar_t* __restrict__ extra,
                      scalar_t* __restrict__ out, int c_in, int c_out, int c_in_per_group, int c_out_per_group,
                      int length, int out_length, int kernel, int dilation, int pad_left, int n_tiles,
                      int64_t total_blocks, int weight_smem_bytes, bool stage_x, Activation act, Epilogue epilogue) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* w_s = reinterpret_cast<acc_t*>(smem);
  scalar_t* x_s = reinterpret_cast<scalar_t*>(smem + weight_smem_bytes);

  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int tile = nt * kOutputsPerThread;
  const int taps = c_in_per_group * kernel;
  const int span = (kernel - 1) * dilation;
  const bool w_in_smem = weight_smem_bytes > 0;

  // co varies fastest so that the blocks of one group reading the same x tile run together.
  for (int64_t blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
    const int co = static_cast<int>(blk % c_out);
    const int64_t rest = blk / c_out;
    const int t0 = static_cast<int>(rest % n_tiles) * tile;
    const int64_t b = rest / n_tiles;
    const int g = co / c_out_per_group;
    const scalar_t* w_co = weight + static_cast<int64_t>(co) * taps;
    const scalar_t* x_g = x + (b * c_in + static_cast<int64_t>(g) * c_in_per_group) * length;
    const int x0 = t0 - pad_left;  // input position of this tile's first tap

    __syncthreads();  // the previous iteration has finished reading shared memory
    if (w_in_smem) {
      for (int i = tid; i < taps; i += nt) w_s[i] = static_cast<acc_t>(__ldg(w_co + i));
    }
    if (stage_x) {
      // Zero padding is materialised here, so the tap loop below has no bounds checks.
      const int window = tile + span;
      for (int i = tid; i < window; i += nt) {
        const int p = x0 + i;
        x_s[i] = (p >= 0 && p < length) ? __ldg(x_g + p) : scalar_t(0);
      }
    }
    __syncthreads();

    acc_t acc[kOutputsPerThread];
#pragma unroll
    for (int j = 0; j < kOutputsPerThread; ++j) acc[j] = acc_t(0);

    if (stage_x) {
      // Outputs past out_length read window slots past the loaded range (allocated, unused).
      for (int k = 0; k < kernel; ++k) {
        const acc_t wk = w_in_smem ? w_s[k] : static_cast<acc_t>(__ldg(w_co + k));
        const scalar_t* xs = x_s + k * dilation + tid;
#pragma unroll
        for (int j = 0; j < kOutputsPerThread; ++j) acc[j] += wk * static_cast<acc_t>(xs[j * nt]);
      }
    } else {
      for (int ci = 0; ci < c_in_per_group; ++ci) {
        const scalar_t* x_row = x_g + static_cast<int64_t>(ci) * length;
        for (int k = 0; k < kernel; ++k) {
          const int tap = ci * kernel + k;
          const acc_t wk = w_in_smem ? w_s[tap] : static_cast<acc_t>(__ldg(w_co + tap));
          const int p0 = x0 + tid + k * dilation;
#pragma unroll
          for (int j = 0; j < kOutputsPerThread; ++j) {
            const int p = p0 + j * nt;
            if (static_cast<unsigned>(p) < static_cast<unsigned>(length)) {
              acc[j] += wk * static_cast<acc_t>(__ldg(x_row + p));
            }
          }
        }
      }
    }

    const acc_t bv = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);
    const int64_t row = (b * c_out + co) * static_cast<int64_t>(out_length);
#pragma unroll
    for (int j = 0; j < kOutputsPerThread; ++j) {
      const int t = t0 + j * nt + tid;
      if (t < out_length) {
        const acc_t z = acc[j] + bv;
        acc_t y;
        if (epilogue == Epilogue::Forward) {
          y = activation_forward(z, act);
          if (extra != nullptr) y += static_cast<acc_t>(extra[row + t]);
        } else {
          y = static_cast<acc_t>(extra[row + t]) * activation_grad(z, act);
        }
        out[row + t] = static_cast<scalar_t>(y);
      }
    }
  }
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace

void launch_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& extra,
                 const at::Tensor& out, int64_t dilation, int64_t pad_left, int64_t groups, Activation act,
                 Epilogue epilogue) {
  const int64_t batch = x.size(0), c_in = x.size(1), length = x.size(2);
  const int64_t c_out = weight.size(0), c_in_g = weight.size(1), kernel = weight.size(2);
  const int64_t out_length = out.size(2);
  if (out.numel() == 0) return;
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous());
  TORCH_INTERNAL_ASSERT(!bias.defined() || bias.is_contiguous());
  TORCH_INTERNAL_ASSERT(!extra.defined() || extra.is_contiguous());
  TORCH_INTERNAL_ASSERT(epilogue == Epilogue::Forward || extra.defined());

  if (kernel == 1) dilation = 1;  // a single tap never moves; keeps huge dilations out of int math
  TORCH_CHECK(length < kMaxRowExtent && out_length < kMaxRowExtent && (kernel - 1) < kMaxRowExtent / dilation,
              kOp, " (CUDA): the input length (", length, "), output length (", out_length,
              ") and receptive field (K-1)*dilation (", kernel - 1, "*", dilation, ") must each be below 2^29");
  const int64_t span = (kernel - 1) * dilation;
  TORCH_CHECK(c_in < std::numeric_limits<int>::max() && c_out < std::numeric_limits<int>::max() &&
                  c_in_g * kernel < std::numeric_limits<int>::max(),
              kOp, " (CUDA): channel counts must fit in int32, got C_in=", c_in, ", C_out=", c_out, ", K=", kernel);
  // Beyond these bounds every tap falls outside [0, L) for every output either way; clamping
  // keeps positions in int range without changing the result.
  pad_left = std::min(std::max(pad_left, -length), out_length + span);

  const int threads = static_cast<int>(
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, round_up((out_length + kOutputsPerThread - 1) /
                                                                         kOutputsPerThread, 32))));
  const int64_t tile = int64_t(threads) * kOutputsPerThread;
  const int64_t n_tiles = (out_length + tile - 1) / tile;
  const int64_t total_blocks = batch * c_out * n_tiles;
  const int64_t grid = std::min<int64_t>(total_blocks, std::numeric_limits<int>::max());
  const int64_t taps = c_in_g * kernel;
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const int64_t w_bytes = round_up(taps * static_cast<int64_t>(c10::elementSize(acc_type)), 16);
  const int64_t w_smem = w_bytes <= kMaxWeightSmemBytes ? w_bytes : 0;
  // Staging pays when the window is not much wider than the tile (dilation <= tile): beyond
  // that the K taps of a tile are disjoint and staging would read the gaps between them too.
  const int64_t x_smem = (span + tile) * static_cast<int64_t>(x.element_size());
  const bool stage_x = c_in_g == 1 && dilation <= tile && w_smem + x_smem <= kMaxSmemBytes;
  const int64_t smem = w_smem + (stage_x ? x_smem : 0);

  const c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "dilated_conv1d_cuda",
                                  [&] {
                                    dilated_conv1d_kernel<scalar_t><<<static_cast<unsigned>(grid), threads,
                                                                      static_cast<size_t>(smem), stream>>>(
                                        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                        extra.defined() ? extra.const_data_ptr<scalar_t>() : nullptr,
                                        out.mutable_data_ptr<scalar_t>(), static_cast<int>(c_in),
                                        static_cast<int>(c_out), static_cast<int>(c_in_g),
                                        static_cast<int>(c_out / groups), static_cast<int>(length),
                                        static_cast<int>(out_length), static_cast<int>(kernel),
                                        static_cast<int>(dilation), static_cast<int>(pad_left),
                                        static_cast<int>(n_tiles), total_blocks, static_cast<int>(w_smem), stage_x,
                                        act, epilogue);
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
}

namespace {

at::Tensor dilated_conv1d_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& residual, int64_t dilation, int64_t pad_left,
                               int64_t out_length, int64_t groups, c10::string_view activation) {
  const Geometry geo = check_forward(x, weight, bias, residual, dilation, pad_left, out_length, groups);
  const Activation act = parse_activation(std::string(activation), kOp);
  TORCH_CHECK(x.is_cuda(), kOp, " (CUDA): x must be a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());

  at::Tensor out = at::empty({geo.batch, geo.c_out, out_length}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() && residual->defined() ? residual->contiguous() : at::Tensor();
  launch_conv(x.contiguous(), weight.contiguous(), b, r, out, dilation, pad_left, groups, act, Epilogue::Forward);
  return out;
}

}  // namespace
}  // namespace accel::dilated_conv1d::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) {
  m.impl("dilated_conv1d", &accel::dilated_conv1d::cuda::dilated_conv1d_cuda);
}
