// Partial convolution (FasterNet's PConv): shared declarations for the schema file and the backends.
//
// With Cp = dim_conv:
//   out[b, c] = bias[c] + sum_{ci < Cp, kh, kw} w[c, ci, kh, kw] * x[b, ci, y + kh - 1, x + kw - 1]   (c < Cp)
//   out[b, c] = x[b, c]                                                                              (c >= Cp)
// x read as zero outside the image (stride 1, padding 1). The output has x's memory format
// (channels_last when x is, contiguous otherwise); any input strides are read as given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace accel::partial_conv2d {

constexpr const char* kOp = "partial_conv2d";

struct Geometry {
  int64_t batch, channels, height, width, cp;
};

// Validates every argument of the forward op and returns the resolved sizes.
Geometry check_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t dim_conv);

// Validates the backward op's arguments (grad_out must have x's shape).
Geometry check_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t dim_conv);

// The in-place op's checks: the forward's, and weight and bias not overlapping x.
Geometry check_inplace(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t dim_conv);

// An uninitialised tensor of x's shape in the output's memory format.
at::Tensor empty_like_output(const at::Tensor& x);

}  // namespace accel::partial_conv2d
