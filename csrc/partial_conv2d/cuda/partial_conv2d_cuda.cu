// CUDA backend of accel::partial_conv2d: checks, then the kernels of partial_conv2d_kernels.cuh on
// the current stream (the untouched channels are one ATen copy on the same stream). No host
// synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>

#include "partial_conv2d/cuda/partial_conv2d_kernels.cuh"
#include "partial_conv2d/partial_conv2d.h"

namespace accel::partial_conv2d::cuda {
namespace {

using at::Tensor;

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kWgradBlocksPerSM = 4;

void check_cuda_dtype(const Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, kOp, ": x has dtype ",
                   t, "; the CUDA kernels take float32, float64, bfloat16 and float16");
}

Strides strides_of(const Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// out[:, cp:] = in[:, cp:] (one copy on the current stream, in both tensors' layouts).
void copy_untouched(const Tensor& in, int64_t cp, Tensor& out) {
  const int64_t rest = in.size(1) - cp;
  if (rest > 0) out.narrow(1, cp, rest).copy_(in.narrow(1, cp, rest));
}

// Channels [0, cp) of out = the 3x3 convolution of channels [0, cp) of in (weights transposed and
// flipped for grad_x).
void conv_into(const Tensor& in, const Tensor& weight, const Tensor& bias, int64_t cp, bool transposed, Tensor& out) {
  const int64_t B = in.size(0), H = in.size(2), W = in.size(3);
  if (B == 0 || H == 0 || W == 0) return;
  const Strides is = strides_of(in);
  const ConvParams p{in.const_data_ptr(), is, out.mutable_data_ptr(), strides_of(out), weight.const_data_ptr(),
                     bias.defined() ? bias.const_data_ptr() : nullptr, B, H, W, cp, transposed,
                     channel_fastest(is)};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "partial_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ConvPlan pl = plan_conv<acc_t>(H, W, cp);
    TORCH_CHECK(pl.blocks(B) <= kMaxGridX && pl.co_groups <= kMaxGridYZ, kOp, ": input of shape ", in.sizes(),
                " needs more CUDA blocks than a launch allows");
    launch_conv<scalar_t, acc_t>(p, pl, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor partial_conv2d_cuda(const Tensor& x, const Tensor& weight_, const std::optional<Tensor>& bias_,
                           int64_t dim_conv) {
  const Geometry g = check_forward(x, weight_, bias_, dim_conv);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  Tensor out = empty_like_output(x);
  if (out.numel() == 0) return out;
  copy_untouched(x, g.cp, out);
  const Tensor weight = weight_.contiguous();
  const Tensor bias = bias_.has_value() && bias_->defined() ? bias_->contiguous() : Tensor();
  conv_into(x, weight, bias, g.cp, /*transposed=*/false, out);
  return out;
}

// In place: the convolution goes to a (B, Cp, H, W) temporary (blocks read halo pixels that another
// block would already have overwritten), then over x's first Cp channels, on the current stream.
void partial_conv2d_inplace_cuda(const Tensor& x, const Tensor& weight_, const std::optional<Tensor>& bias_,
                                 int64_t dim_conv) {
  const Geometry g = check_inplace(x, weight_, bias_, dim_conv);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (x.numel() == 0) return;
  Tensor tmp = at::empty({g.batch, g.cp, g.height, g.width}, x.options());
  const Tensor weight = weight_.contiguous();
  const Tensor bias = bias_.has_value() && bias_->defined() ? bias_->contiguous() : Tensor();
  conv_into(x, weight, bias, g.cp, /*transposed=*/false, tmp);
  x.narrow(1, 0, g.cp).copy_(tmp);
}

std::tuple<Tensor, Tensor, Tensor> partial_conv2d_backward_cuda(const Tensor& grad_out, const Tensor& x,
                                                                 const Tensor& weight_,
                                                                 const std::optional<Tensor>& bias,
                                                                 int64_t dim_conv, std::array<bool, 3> mask) {
  const Geometry g = check_backward(grad_out, x, weight_, bias, dim_conv);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor grad_x = mask[0] ? empty_like_output(x) : at::empty({0}, x.options());
  Tensor grad_w = mask[1] ? at::empty(weight_.sizes(), weight_.options()) : at::empty({0}, x.options());
  Tensor grad_b = mask[2] && has_bias ? at::empty({g.cp}, weight_.options()) : at::empty({0}, x.options());
  const bool want_b = grad_b.numel() > 0;
  const bool empty = x.numel() == 0;
  if (empty) {  // nothing to sum over
    if (mask[1]) grad_w.zero_();
    if (want_b) grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  const Tensor weight = weight_.contiguous();
  if (mask[0]) {
    copy_untouched(grad_out, g.cp, grad_x);
    conv_into(grad_out, weight, Tensor(), g.cp, /*transposed=*/true, grad_x);
  }
  if (!mask[1] && !want_b) return {grad_x, grad_w, grad_b};

  const Strides xs = strides_of(x), gs = strides_of(grad_out);
  const WgradParams p{x.const_data_ptr(), xs, grad_out.const_data_ptr(), gs, g.batch, g.height, g.width, g.cp,
                      channel_fastest(xs), channel_fastest(gs)};
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "partial_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const WgradPlan pl = plan_wgrad<acc_t>(g.batch, g.height, g.width, g.cp, kWgradBlocksPerSM * sms);
    TORCH_CHECK(pl.splits <= kMaxGridX && pl.co_groups <= kMaxGridYZ && pl.ci_groups <= kMaxGridYZ, kOp,
                ": dim_conv ", g.cp, " needs more CUDA blocks than a launch allows");
    // the splits' partial sums, in the accumulation type
    Tensor partial = at::empty({pl.splits * wgrad_row(g.cp)}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    launch_wgrad<scalar_t, acc_t>(p, pl, partial.mutable_data_ptr<acc_t>(),
                                  mask[1] ? grad_w.mutable_data_ptr<scalar_t>() : nullptr,
                                  want_b ? grad_b.mutable_data_ptr<scalar_t>() : nullptr, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace accel::partial_conv2d::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) {
  m.impl("partial_conv2d", &accel::partial_conv2d::cuda::partial_conv2d_cuda);
  m.impl("partial_conv2d_backward", &accel::partial_conv2d::cuda::partial_conv2d_backward_cuda);
  m.impl("partial_conv2d_", &accel::partial_conv2d::cuda::partial_conv2d_inplace_cuda);
}
