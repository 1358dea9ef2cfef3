// CPU helpers shared by partial_conv2d's kernel files: the untouched channels' reductions (see
// untouched_sums.cpp) and the dtype check.
#pragma once

#include <ATen/core/Tensor.h>

namespace accel::partial_conv2d {

// For c >= cp, per (b, c - cp): sum_gx = sum_{y,x} grad_out * x, sum_g = sum_{y,x} grad_out, into
// (B, C - cp) tensors of the accumulation type (fp32 for bf16). Either layout; deterministic.
void untouched_sums_cpu(const at::Tensor& grad_out, const at::Tensor& x, int64_t cp, at::Tensor& sum_gx,
                        at::Tensor& sum_g);

// The CPU kernels' dtypes (float32, float64, bfloat16), or a TypeError naming op.
void check_cpu_dtype(const char* op, const at::Tensor& x);

}  // namespace accel::partial_conv2d
