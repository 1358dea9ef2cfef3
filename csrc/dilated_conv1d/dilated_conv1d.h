// Dilated 1-D convolution: shared declarations for the schema file and the backends.
//
// out[b, co, t] = act( bias[co] + sum_{ci in group(co), k} w[co, ci, k] * x[b, ci, t + k*dilation - pad_left] )
//                 (+ residual[b, co, t])
// with x taken as zero outside [0, L). pad_left may be any integer (negative crops); the
// output length is given explicitly, so causal, same and symmetric padding all map onto it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace accel::dilated_conv1d {

constexpr const char* kOp = "dilated_conv1d";

struct Geometry {
  int64_t batch, c_in, c_out, length, kernel, groups, c_in_per_group, c_out_per_group, out_length;
  int64_t dilation, pad_left;
};

// Validates every argument of the forward op and returns the resolved sizes.
Geometry check_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& residual, int64_t dilation, int64_t pad_left,
                       int64_t out_length, int64_t groups);

// Validates the backward op's arguments (grad_out must match the forward output).
Geometry check_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t dilation, int64_t pad_left, int64_t groups);

// The weight of the transposed convolution that maps grad(out) to grad(x): for group g,
// w_t[g*Cin_g + ci, co, K-1-k] = w[g*Cout_g + co, ci, k]; the matching left padding is
// (K-1)*dilation - pad_left and the output length is L.
at::Tensor transposed_weight(const at::Tensor& weight, int64_t groups);

}  // namespace accel::dilated_conv1d
