// GEMM-shaped dilated convolutions on CPU (several input and output channels per group): im2col
// tiles that stay in L2, multiplied with oneDNN's brgemm micro-kernel through ATen's cpublas.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/activation.h"
#include "dilated_conv1d/dilated_conv1d.h"

namespace accel::dilated_conv1d::cpu {

// Whether the GEMM path serves this shape and dtype (fp32/bf16/fp16 with >= 4 input and output
// channels per group; the direct kernel does the rest, fp64 included).
bool gemm_path_applies(const Geometry& g, at::ScalarType dtype);

// out = act(conv(x) + bias) + residual; x and weight contiguous, out allocated (B, C_out, L_out).
void forward_gemm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& residual, at::Tensor& out, const Geometry& g, Activation act);

// grad_w (C_out, C_in/groups, K) and grad_b (C_out,) (either may be undefined) from dz (B, C_out,
// L_out) and x, both contiguous.
void weight_grad_gemm(const at::Tensor& dz, const at::Tensor& x, const Geometry& g, at::Tensor& grad_w,
                      at::Tensor& grad_b);

}  // namespace accel::dilated_conv1d::cpu
