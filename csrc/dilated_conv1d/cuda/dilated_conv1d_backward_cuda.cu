// CUDA backward of accel::dilated_conv1d.
//
//   dz      = grad_out * act'(z), z = conv(x) + bias recomputed by the forward kernel, whose
//             epilogue applies act' directly (one kernel, z never stored); dz = grad_out for "none"
//   grad_x  = conv(dz, transposed_weight), pad_left' = (K-1)*dilation - pad_left: the forward kernel
//   grad_w  = sum_{b,t} dz[b,co,t] * x[b, g*Cin_g+ci, t + k*dilation - pad_left]: the kernel below
//   grad_b  = sum_{b,t} dz[b,co,t], folded into the grad_w kernel
//
// grad_w kernel: one block per (co, group of kTaps taps, chunk of the flattened (b, t) range).
// Each thread keeps its partial sums of the block's taps (and of the bias) in registers while it
// strides through the chunk, the block reduces them with warp shuffles, and one atomicAdd per
// tap lands in an fp32 (fp64 for double) buffer that is cast to the weight dtype at the end.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <string>
#include <tuple>

#include "common/activation.h"
#include "dilated_conv1d/cuda/dilated_conv1d_cuda.h"
#include "dilated_conv1d/dilated_conv1d.h"

namespace accel::dilated_conv1d::cuda {
namespace {

constexpr int kGradWeightThreads = 256;
constexpr int kWarps = kGradWeightThreads / 32;
constexpr int64_t kMaxRowExtent = int64_t(1) << 29;  // as in the forward launcher
// A tap shift that puts every position out of range (t < 2^29): marks unused tap slots.
constexpr int kDeadShift = -(1 << 30);

// At least 2 resident blocks per SM (<= 128 registers, no spills): left alone, the 16-tap variant
// spends more registers on loads in flight and fits only one block per SM; 3 blocks would spill.
template <typename scalar_t, int kTaps>
__global__ void __launch_bounds__(kGradWeightThreads, 2)
dilated_conv1d_grad_weight_kernel(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ x,
                                  at::opmath_type<scalar_t>* __restrict__ grad_w,
                                  at::opmath_type<scalar_t>* __restrict__ grad_b, int c_in, int c_out,
                                  int c_in_per_group, int c_out_per_group, int length, int out_length, int kernel,
                                  int dilation, int pad_left, int n_taps, int n_passes, int64_t n_chunks,
                                  int64_t chunk_len, int64_t n_elems, int64_t total_blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kWarps][kTaps + 1];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  for (int64_t blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
    const int64_t chunk = blk % n_chunks;
    const int64_t rest = blk / n_chunks;
    const int pass = static_cast<int>(rest % n_passes);
    const int co = static_cast<int>(rest / n_passes);
    const int g = co / c_out_per_group;
    const int j0 = pass * kTaps;
    const bool with_bias = grad_b != nullptr && pass == 0;

    // Per tap slot: offset of its input row within the group's rows (int: the host checks that
    // C_in/groups * L fits, which keeps the register count down), and its shift along t.
    int row_off[kTaps];
    int shift[kTaps];
#pragma unroll
    for (int i = 0; i < kTaps; ++i) {
      const int j = j0 + i;
      const int ci = j / kernel;
      const bool live = j < n_taps;
      row_off[i] = live ? ci * length : 0;
      shift[i] = live ? (j - ci * kernel) * dilation - pad_left : kDeadShift;
    }

    acc_t acc[kTaps + 1];
#pragma unroll
    for (int i = 0; i <= kTaps; ++i) acc[i] = acc_t(0);

    int64_t n = chunk * chunk_len + tid;
    const int64_t end = std::min(n_elems, (chunk + 1) * chunk_len);
    if (n < end) {
      int64_t b = n / out_length;
      int t = static_cast<int>(n - b * out_length);
      for (; n < end; n += kGradWeightThreads) {
        const acc_t gv = static_cast<acc_t>(__ldg(dz + (b * c_out + co) * out_length + t));
        const scalar_t* xb = x + (b * c_in + static_cast<int64_t>(g) * c_in_per_group) * length;
#pragma unroll
        for (int i = 0; i < kTaps; ++i) {
          const int p = t + shift[i];
          if (static_cast<unsigned>(p) < static_cast<unsigned>(length)) {
            acc[i] += gv * static_cast<acc_t>(__ldg(xb + row_off[i] + p));
          }
        }
        acc[kTaps] += gv;
        t += kGradWeightThreads;
        if (t >= out_length) {  // next batch item(s); a division only on wrap-around
          b += t / out_length;
          t %= out_length;
        }
      }
    }

#pragma unroll
    for (int i = 0; i <= kTaps; ++i) {
      acc_t v = acc[i];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) partial[warp][i] = v;
    }
    __syncthreads();
    if (tid <= kTaps) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += partial[w][tid];
      if (tid < kTaps) {
        if (j0 + tid < n_taps) atomicAdd(grad_w + static_cast<int64_t>(co) * n_taps + j0 + tid, s);
      } else if (with_bias) {
        atomicAdd(grad_b + co, s);
      }
    }
    __syncthreads();  // `partial` is reused by the next iteration
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int kTaps>
void launch_grad_weight(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& grad_w, const at::Tensor& grad_b,
                        int64_t kernel, int64_t dilation, int64_t pad_left, int64_t groups, int64_t n_taps) {
  const int64_t batch = x.size(0), c_in = x.size(1), length = x.size(2);
  const int64_t c_out = dz.size(1), out_length = dz.size(2);
  const int64_t n_elems = batch * out_length;
  const int64_t n_passes = std::max<int64_t>(1, ceil_div(n_taps, kTaps));
  // Enough blocks for two waves of full occupancy; each thread handles at least 4 elements.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_blocks = sms * (2048 / kGradWeightThreads) * 2;
  int64_t n_chunks = ceil_div(target_blocks, c_out * n_passes);
  n_chunks = std::clamp<int64_t>(n_chunks, 1, std::max<int64_t>(1, ceil_div(n_elems, kGradWeightThreads * 4)));
  const int64_t chunk_len = ceil_div(n_elems, n_chunks);
  n_chunks = ceil_div(n_elems, chunk_len);
  const int64_t total_blocks = c_out * n_passes * n_chunks;
  const int64_t grid = std::min<int64_t>(total_blocks, std::numeric_limits<int>::max());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "dilated_conv1d_grad_weight_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dilated_conv1d_grad_weight_kernel<scalar_t, kTaps><<<static_cast<unsigned>(grid), kGradWeightThreads, 0,
                                                             stream>>>(
            dz.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            grad_w.defined() ? grad_w.mutable_data_ptr<acc_t>() : nullptr,
            grad_b.defined() ? grad_b.mutable_data_ptr<acc_t>() : nullptr, static_cast<int>(c_in),
            static_cast<int>(c_out), static_cast<int>(c_in / groups), static_cast<int>(c_out / groups),
            static_cast<int>(length), static_cast<int>(out_length), static_cast<int>(kernel),
            static_cast<int>(dilation), static_cast<int>(pad_left), static_cast<int>(n_taps),
            static_cast<int>(n_passes), n_chunks, chunk_len, n_elems, total_blocks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dilated_conv1d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    int64_t dilation, int64_t pad_left, int64_t groups, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Geometry geo = check_backward(grad_out, x, weight, bias, dilation, pad_left, groups);
  const Activation act = parse_activation(std::string(activation), kOp);
  TORCH_CHECK(x.is_cuda(), kOp, " (CUDA): x must be a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());

  const bool has_bias = bias.has_value() && bias->defined();
  const bool want_x = output_mask[0], want_w = output_mask[1], want_b = output_mask[2] && has_bias;
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options());
  at::Tensor grad_b = at::empty({0}, x.options());
  if (!want_x && !want_w && !want_b) return {grad_x, grad_w, grad_b};

  const int64_t kernel = geo.kernel, length = geo.length, out_length = geo.out_length;
  if (kernel == 1) dilation = 1;  // a single tap never moves
  TORCH_CHECK(length < kMaxRowExtent && out_length < kMaxRowExtent && (kernel - 1) < kMaxRowExtent / dilation,
              kOp, " (CUDA): the input length (", length, "), output length (", out_length,
              ") and receptive field (K-1)*dilation (", kernel - 1, "*", dilation, ") must each be below 2^29");
  const int64_t span = (kernel - 1) * dilation;
  // Beyond these bounds no output depends on x either way, so clamping changes no gradient.
  pad_left = std::min(std::max(pad_left, -length), out_length + span);

  const at::Tensor go = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor dz = go;
  if (act != Activation::None && go.numel() > 0) {
    dz = at::empty(go.sizes(), go.options());
    launch_conv(xc, wc, has_bias ? bias->contiguous() : at::Tensor(), go, dz, dilation, pad_left, groups, act,
                Epilogue::ActivationGrad);
  }

  if (want_x) {
    grad_x = at::empty(x.sizes(), x.options());  // contiguous, as the fake function promises
    if (grad_x.numel() > 0) {
      launch_conv(dz, transposed_weight(wc, groups), at::Tensor(), at::Tensor(), grad_x, dilation, span - pad_left,
                  groups, Activation::None, Epilogue::Forward);
    }
  }

  if (want_w || want_b) {
    const at::TensorOptions acc_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
    const int64_t n_taps = want_w ? geo.c_in_per_group * kernel : 0;
    at::Tensor gw_acc = want_w ? at::zeros({geo.c_out, geo.c_in_per_group, kernel}, acc_opts) : at::Tensor();
    at::Tensor gb_acc = want_b ? at::zeros({geo.c_out}, acc_opts) : at::Tensor();
    TORCH_CHECK(geo.c_in_per_group * length < std::numeric_limits<int>::max() &&
                    geo.c_in < std::numeric_limits<int>::max() && geo.c_out < std::numeric_limits<int>::max(),
                kOp, " (CUDA): the weight gradient needs C_in/groups * L < 2^31 and channel counts below 2^31, got "
                "C_in=", geo.c_in, ", groups=", groups, ", L=", length, ", C_out=", geo.c_out);
    if (dz.numel() > 0) {
      if (n_taps <= 4) {
        launch_grad_weight<4>(dz, xc, gw_acc, gb_acc, kernel, dilation, pad_left, groups, n_taps);
      } else {
        launch_grad_weight<16>(dz, xc, gw_acc, gb_acc, kernel, dilation, pad_left, groups, n_taps);
      }
    }
    if (want_w) grad_w = gw_acc.to(x.scalar_type());
    if (want_b) grad_b = gb_acc.to(x.scalar_type());
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace accel::dilated_conv1d::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) {
  m.impl("dilated_conv1d_backward", &accel::dilated_conv1d::cuda::dilated_conv1d_backward_cuda);
}
