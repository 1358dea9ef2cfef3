// Partial convolution (FasterNet's PConv): shared declarations for the schema file and the backends.
//
// With Cp = dim_conv:
//   out[b, c] = bias[c] + sum_{ci < Cp, kh, kw} w[c, ci, kh, kw] * x[b, ci, y + kh - 1, x + kw - 1]   (c < Cp)
//   out[b, c] = x[b, c] * scale[b, c - Cp] + shift[b, c - Cp]                                       (c >= Cp)
// (scale and shift optional, (B, C - Cp): PAT_ch's gate and folded BatchNorm; without them a copy).
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

using OptTensor = c10::optional<at::Tensor>;

// Validates every argument of the forward op and returns the resolved sizes.
Geometry check_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, int64_t dim_conv,
                       const OptTensor& scale, const OptTensor& shift);

// Validates the backward op's arguments (grad_out must have x's shape).
Geometry check_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const OptTensor& bias, int64_t dim_conv, const OptTensor& scale, const OptTensor& shift);

// The in-place op's checks: the forward's, and weight, bias, scale and shift not overlapping x.
Geometry check_inplace(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, int64_t dim_conv,
                       const OptTensor& scale, const OptTensor& shift);

// An uninitialised tensor of x's shape in the output's memory format.
at::Tensor empty_like_output(const at::Tensor& x);

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// out[:, cp:] = in[:, cp:] * scale + shift, either optional (a copy without both): one pass on
// in's device, in both tensors' layouts, accumulating in fp32 for reduced-precision types.
void untouched_into(const at::Tensor& in, int64_t cp, const OptTensor& scale, const OptTensor& shift,
                    const at::Tensor& out);

// PAT_ch's statistics of the untouched channels c >= Cp, N = H * W:
//   mean[b, c - Cp] = sum_{y,x} x[b, c, y, x] / N,  std[b, c - Cp] = sqrt(sum (x - mean)^2 / (N - 1))
// (the unbiased std of torch.std; NaN for N = 1, as there). Both (B, C - Cp), in x's dtype.
constexpr const char* kStatsOp = "partial_conv2d_stats";
Geometry check_stats(const at::Tensor& x, int64_t dim_conv);
Geometry check_stats_backward(const at::Tensor& grad_mean, const at::Tensor& grad_std, const at::Tensor& x,
                              const at::Tensor& mean, const at::Tensor& std, int64_t dim_conv);

}  // namespace accel::partial_conv2d
