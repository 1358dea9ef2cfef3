// CUDA backend of accel::partial_conv2d and partial_conv2d_stats: checks, then the kernels of
// partial_conv2d_kernels.cuh and untouched_sums.cuh on the current stream (the untouched channels'
// scale and shift are one ATen pass on the same stream). No host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>

#include "partial_conv2d/cuda/partial_conv2d_kernels.cuh"
#include "partial_conv2d/cuda/untouched_sums.cuh"
#include "partial_conv2d/partial_conv2d.h"

namespace accel::partial_conv2d::cuda {
namespace {

using at::Tensor;

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kWgradBlocksPerSM = 4;
constexpr int64_t kSumsBlocksPerSM = 4;

void check_cuda_dtype(const Tensor& x, const char* op = kOp) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op, ": x has dtype ",
                   t, "; the CUDA kernels take float32, float64, bfloat16 and float16");
}

Strides strides_of(const Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Per plane (b, c >= cp) of a: kStats, out1 = mean and out2 = std of a (b undefined); otherwise
// out1 = sum a * b and out2 = sum a. out1 and out2 are (B, C - cp) contiguous, of out_t.
template <bool kStats, typename out_t>
void untouched_sums(const Tensor& a, const Tensor& b, int64_t cp, Tensor& out1, Tensor& out2) {
  const SumsParams p{a.const_data_ptr(), strides_of(a), b.defined() ? b.const_data_ptr() : nullptr,
                     b.defined() ? strides_of(b) : Strides{}, a.size(0), cp, a.size(1) - cp,
                     a.size(2) * a.size(3), a.size(3), channel_fastest(strides_of(a))};
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const SumsPlan pl = plan_sums(p, kSumsBlocksPerSM * sms);
  TORCH_CHECK(pl.blocks_x <= kMaxGridX, kOp, ": input of shape ", a.sizes(),
              " needs more CUDA blocks than a launch allows");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "partial_conv2d_untouched_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor partial = at::empty({pl.shares * p.batch * p.cu * 2}, a.options().dtype(at::toOpMathType(a.scalar_type())));
    launch_sums<kStats, scalar_t, acc_t, out_t>(p, pl, partial.mutable_data_ptr<acc_t>(),
                                                out1.mutable_data_ptr<out_t>(), out2.mutable_data_ptr<out_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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

Tensor partial_conv2d_cuda(const Tensor& x, const Tensor& weight_, const OptTensor& bias_, int64_t dim_conv,
                           const OptTensor& scale, const OptTensor& shift) {
  const Geometry g = check_forward(x, weight_, bias_, dim_conv, scale, shift);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  Tensor out = empty_like_output(x);
  if (out.numel() == 0) return out;
  untouched_into(x, g.cp, scale, shift, out);
  const Tensor weight = weight_.contiguous();
  const Tensor bias = bias_.has_value() && bias_->defined() ? bias_->contiguous() : Tensor();
  conv_into(x, weight, bias, g.cp, /*transposed=*/false, out);
  return out;
}

// In place: the convolution goes to a (B, Cp, H, W) temporary (blocks read halo pixels that another
// block would already have overwritten), then over x's first Cp channels, on the current stream.
void partial_conv2d_inplace_cuda(const Tensor& x, const Tensor& weight_, const OptTensor& bias_, int64_t dim_conv,
                                 const OptTensor& scale, const OptTensor& shift) {
  const Geometry g = check_inplace(x, weight_, bias_, dim_conv, scale, shift);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (x.numel() == 0) return;
  if (given(scale) || given(shift)) untouched_into(x, g.cp, scale, shift, x);
  Tensor tmp = at::empty({g.batch, g.cp, g.height, g.width}, x.options());
  const Tensor weight = weight_.contiguous();
  const Tensor bias = bias_.has_value() && bias_->defined() ? bias_->contiguous() : Tensor();
  conv_into(x, weight, bias, g.cp, /*transposed=*/false, tmp);
  x.narrow(1, 0, g.cp).copy_(tmp);
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Grads partial_conv2d_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& weight_,
                                   const OptTensor& bias, int64_t dim_conv, const OptTensor& scale,
                                   const OptTensor& shift, std::array<bool, 5> mask) {
  const Geometry g = check_backward(grad_out, x, weight_, bias, dim_conv, scale, shift);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor grad_x = mask[0] ? empty_like_output(x) : at::empty({0}, x.options());
  Tensor grad_w = mask[1] ? at::empty(weight_.sizes(), weight_.options()) : at::empty({0}, x.options());
  Tensor grad_b = mask[2] && has_bias ? at::empty({g.cp}, weight_.options()) : at::empty({0}, x.options());
  Tensor grad_scale = at::empty({0}, x.options()), grad_shift = at::empty({0}, x.options());
  const bool want_b = grad_b.numel() > 0;
  const bool want_scale = mask[3] && given(scale), want_shift = mask[4] && given(shift);
  const bool empty = x.numel() == 0;
  if (want_scale || want_shift) {  // per-plane sums of grad_out * x and grad_out, in x's dtype
    Tensor sum_gx = at::empty({g.batch, g.channels - g.cp}, x.options()), sum_g = at::empty_like(sum_gx);
    if (empty) {
      sum_gx.zero_(), sum_g.zero_();
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "partial_conv2d_scale_grad", [&] {
        untouched_sums<false, scalar_t>(grad_out, x, g.cp, sum_gx, sum_g);
      });
    }
    if (want_scale) grad_scale = sum_gx;
    if (want_shift) grad_shift = sum_g;
  }
  if (empty) {  // nothing to sum over
    if (mask[1]) grad_w.zero_();
    if (want_b) grad_b.zero_();
    return {grad_x, grad_w, grad_b, grad_scale, grad_shift};
  }
  const Tensor weight = weight_.contiguous();
  if (mask[0]) {
    untouched_into(grad_out, g.cp, scale, std::nullopt, grad_x);
    conv_into(grad_out, weight, Tensor(), g.cp, /*transposed=*/true, grad_x);
  }
  if (!mask[1] && !want_b) return {grad_x, grad_w, grad_b, grad_scale, grad_shift};

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
  return {grad_x, grad_w, grad_b, grad_scale, grad_shift};
}

std::tuple<Tensor, Tensor> partial_conv2d_stats_cuda(const Tensor& x, int64_t dim_conv) {
  const Geometry g = check_stats(x, dim_conv);
  check_cuda_dtype(x, kStatsOp);
  const c10::cuda::CUDAGuard device_guard(x.device());
  Tensor mean = at::empty({g.batch, g.channels - g.cp}, x.options()), std = at::empty_like(mean);
  if (mean.numel() == 0) return {mean, std};
  if (g.height * g.width == 0) {  // torch.std_mean over an empty plane: NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN()), std.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, std};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "partial_conv2d_stats_cuda", [&] {
    untouched_sums<true, scalar_t>(x, Tensor(), g.cp, mean, std);
  });
  return {mean, std};
}

}  // namespace
}  // namespace accel::partial_conv2d::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) {
  m.impl("partial_conv2d", &accel::partial_conv2d::cuda::partial_conv2d_cuda);
  m.impl("partial_conv2d_backward", &accel::partial_conv2d::cuda::partial_conv2d_backward_cuda);
  m.impl("partial_conv2d_", &accel::partial_conv2d::cuda::partial_conv2d_inplace_cuda);
  m.impl("partial_conv2d_stats", &accel::partial_conv2d::cuda::partial_conv2d_stats_cuda);
}
