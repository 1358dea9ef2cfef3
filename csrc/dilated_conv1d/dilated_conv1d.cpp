// Schema and argument checks for accel::dilated_conv1d. Kernels live in cpu/ and cuda/ and
// register themselves, so a CPU-only build has the same schema.
#include "dilated_conv1d/dilated_conv1d.h"

#include <torch/library.h>

#include "common/checks.h"

namespace accel::dilated_conv1d {

Geometry check_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& residual, int64_t dilation, int64_t pad_left,
                       int64_t out_length, int64_t groups) {
  check_dim(kOp, "x", x, 3, "(B, C_in, L)");
  check_dim(kOp, "weight", weight, 3, "(C_out, C_in / groups, K)");
  check_floating(kOp, "x", x);
  check_same_dtype(kOp, "weight", weight, x, "x");
  check_same_device(kOp, "weight", weight, x, "x");
  TORCH_CHECK_VALUE(groups >= 1, kOp, ": groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(dilation >= 1, kOp, ": dilation must be >= 1, got ", dilation);
  Geometry g{};
  g.batch = x.size(0);
  g.c_in = x.size(1);
  g.length = x.size(2);
  g.c_out = weight.size(0);
  g.kernel = weight.size(2);
  g.groups = groups;
  g.dilation = dilation;
  g.pad_left = pad_left;
  g.out_length = out_length;
  TORCH_CHECK_VALUE(g.kernel >= 1, kOp, ": kernel size (weight.size(2)) must be >= 1, got weight shape ",
                    shape_str(weight));
  TORCH_CHECK_VALUE(g.c_in % groups == 0, kOp, ": groups=", groups, " must divide the input channels C_in=", g.c_in);
  TORCH_CHECK_VALUE(g.c_out % groups == 0, kOp, ": groups=", groups, " must divide the output channels C_out=", g.c_out,
                    " (weight.size(0))");
  g.c_in_per_group = g.c_in / groups;
  g.c_out_per_group = g.c_out / groups;
  TORCH_CHECK_VALUE(weight.size(1) == g.c_in_per_group, kOp, ": weight must have shape (C_out, C_in / groups, K) = (",
                    g.c_out, ", ", g.c_in_per_group, ", K), got ", shape_str(weight));
  TORCH_CHECK_VALUE(out_length >= 0, kOp, ": out_length must be >= 0, got ", out_length,
                    " (the padding leaves no output for L=", g.length, ", K=", g.kernel, ", dilation=", dilation, ")");
  if (bias.has_value() && bias->defined()) {
    check_dim(kOp, "bias", *bias, 1, "(C_out,)");
    TORCH_CHECK_VALUE(bias->size(0) == g.c_out, kOp, ": bias must have shape (", g.c_out, ",), got ", shape_str(*bias));
    check_same_dtype(kOp, "bias", *bias, x, "x");
    check_same_device(kOp, "bias", *bias, x, "x");
  }
  if (residual.has_value() && residual->defined()) {
    check_dim(kOp, "residual", *residual, 3, "(B, C_out, L_out)");
    TORCH_CHECK_VALUE(residual->size(0) == g.batch && residual->size(1) == g.c_out && residual->size(2) == out_length,
                      kOp, ": residual must have the output's shape (", g.batch, ", ", g.c_out, ", ", out_length,
                      "), got ", shape_str(*residual));
    check_same_dtype(kOp, "residual", *residual, x, "x");
    check_same_device(kOp, "residual", *residual, x, "x");
  }
  return g;
}

Geometry check_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t dilation, int64_t pad_left, int64_t groups) {
  check_dim(kOp, "grad_out", grad_out, 3, "(B, C_out, L_out)");
  Geometry g = check_forward(x, weight, bias, c10::nullopt, dilation, pad_left, grad_out.size(2), groups);
  TORCH_CHECK_VALUE(grad_out.size(0) == g.batch && grad_out.size(1) == g.c_out, kOp, ": grad_out must have shape (",
                    g.batch, ", ", g.c_out, ", L_out), got ", shape_str(grad_out));
  check_same_dtype(kOp, "grad_out", grad_out, x, "x");
  check_same_device(kOp, "grad_out", grad_out, x, "x");
  return g;
}

at::Tensor transposed_weight(const at::Tensor& weight, int64_t groups) {
  const int64_t c_out = weight.size(0), c_in_g = weight.size(1), k = weight.size(2);
  const int64_t c_out_g = c_out / groups;
  return weight.view({groups, c_out_g, c_in_g, k}).transpose(1, 2).flip({3}).reshape({groups * c_in_g, c_out_g, k})
      .contiguous();
}

}  // namespace accel::dilated_conv1d

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def(
      "dilated_conv1d(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int dilation, int pad_left, "
      "int out_length, int groups, str activation) -> Tensor");
  m.def(
      "dilated_conv1d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int dilation, "
      "int pad_left, int groups, str activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
