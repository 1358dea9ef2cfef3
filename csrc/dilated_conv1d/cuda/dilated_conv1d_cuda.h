// Internal to the CUDA backend of dilated_conv1d: the direct-convolution launcher shared by the
// forward op (dilated_conv1d_cuda.cu) and the backward op (dilated_conv1d_backward_cuda.cu), which
// reuses it for the activation gradient and for grad_x (a convolution with the transposed weight).
#pragma once

#include <ATen/core/Tensor.h>

#include "common/activation.h"

namespace accel::dilated_conv1d::cuda {

// What the kernel does with z = bias + conv(x, weight) before storing it.
enum class Epilogue : int {
  // out = act(z) (+ extra, the residual, when given)
  Forward = 0,
  // out = extra * act'(z): the gradient w.r.t. the pre-activation, extra being grad_out
  ActivationGrad = 1,
};

// out[b, co, t] for t < out.size(2), with the semantics of the forward op. Every tensor must be
// contiguous, on the current device, of one dtype; out has shape (B, C_out, L_out); bias and
// extra may be undefined. Launches on the current stream; no host synchronisation.
void launch_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& extra,
                 const at::Tensor& out, int64_t dilation, int64_t pad_left, int64_t groups, Activation act,
                 Epilogue epilogue);

}  // namespace accel::dilated_conv1d::cuda
