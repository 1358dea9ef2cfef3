// CUDA backend of accel::streaming_conv1d: checks, then the kernels of streaming_conv1d_kernels.cuh
// on the current stream. No host synchronisation, so a decode step can be captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "streaming_conv1d/cuda/streaming_conv1d_kernels.cuh"
#include "streaming_conv1d/streaming_conv1d.h"

namespace accel::streaming_conv1d::cuda {
namespace {

at::Tensor streaming_conv1d_cuda(const at::Tensor& x, const at::Tensor& state, const at::Tensor& weight_,
                                 const c10::optional<at::Tensor>& bias_, int64_t dilation, int64_t groups,
                                 c10::string_view activation, const c10::optional<at::Tensor>& state_indices) {
  const Geometry g = check(x, state, weight_, bias_, dilation, groups, std::string(activation), state_indices);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty({g.batch, g.c_out, g.chunk}, x.options());
  const at::Tensor weight = weight_.contiguous();
  const bool has_bias = bias_.has_value() && bias_->defined();
  const at::Tensor bias = has_bias ? bias_->contiguous() : at::Tensor();
  const bool indexed = state_indices.has_value() && state_indices->defined();
  Params p{x.const_data_ptr(), state.mutable_data_ptr(), weight.const_data_ptr(),
           has_bias ? bias.const_data_ptr() : nullptr, indexed ? state_indices->const_data_ptr<int32_t>() : nullptr,
           out.mutable_data_ptr(), g.batch, g.c_in, g.c_out, g.chunk, g.kernel, g.dilation, g.c_in_per_group,
           g.c_out_per_group, g.slots, g.state_len, x.stride(0), x.stride(1), x.stride(2), g.act};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "streaming_conv1d_cuda", [&] {
    launch<scalar_t, at::opmath_type<scalar_t>>(p, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace accel::streaming_conv1d::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) { m.impl("streaming_conv1d", &accel::streaming_conv1d::cuda::streaming_conv1d_cuda); }
