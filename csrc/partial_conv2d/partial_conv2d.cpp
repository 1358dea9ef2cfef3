// Schema and argument checks for accel::partial_conv2d. Kernels live in cpu/ and register
// themselves, so every build has the same schema.
#include "partial_conv2d/partial_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "common/checks.h"

namespace accel::partial_conv2d {

Geometry check_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t dim_conv) {
  check_dim(kOp, "x", x, 4, "(B, C, H, W)");
  check_dim(kOp, "weight", weight, 4, "(Cp, Cp, 3, 3)");
  check_floating(kOp, "x", x);
  check_same_dtype(kOp, "weight", weight, x, "x");
  check_same_device(kOp, "weight", weight, x, "x");
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), dim_conv};
  TORCH_CHECK_VALUE(dim_conv >= 1 && dim_conv <= g.channels, kOp, ": dim_conv (the convolved channels, Cp) must be in [1, ",
                    g.channels, "] for x with C=", g.channels, " channels, got ", dim_conv);
  TORCH_CHECK_VALUE(weight.size(0) == dim_conv && weight.size(1) == dim_conv && weight.size(2) == 3 &&
                        weight.size(3) == 3,
                    kOp, ": weight must have shape (Cp, Cp, 3, 3) = (", dim_conv, ", ", dim_conv, ", 3, 3), got ",
                    shape_str(weight));
  if (bias.has_value() && bias->defined()) {
    check_dim(kOp, "bias", *bias, 1, "(Cp,)");
    TORCH_CHECK_VALUE(bias->size(0) == dim_conv, kOp, ": bias must have shape (", dim_conv, ",), got ",
                      shape_str(*bias));
    check_same_dtype(kOp, "bias", *bias, x, "x");
    check_same_device(kOp, "bias", *bias, x, "x");
  }
  return g;
}

Geometry check_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t dim_conv) {
  const Geometry g = check_forward(x, weight, bias, dim_conv);
  check_dim(kOp, "grad_out", grad_out, 4, "(B, C, H, W)");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), kOp, ": grad_out must have x's shape ", shape_str(x), ", got ",
                    shape_str(grad_out));
  check_same_dtype(kOp, "grad_out", grad_out, x, "x");
  check_same_device(kOp, "grad_out", grad_out, x, "x");
  return g;
}

Geometry check_inplace(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t dim_conv) {
  const Geometry g = check_forward(x, weight, bias, dim_conv);
  TORCH_CHECK_VALUE(!shares_memory(weight, x), kOp, "_: weight shares memory with x, which the op writes; pass a copy");
  TORCH_CHECK_VALUE(!(bias.has_value() && bias->defined() && shares_memory(*bias, x)), kOp,
                    "_: bias shares memory with x, which the op writes; pass a copy");
  return g;
}

at::Tensor empty_like_output(const at::Tensor& x) {
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return at::empty(x.sizes(), x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
}

}  // namespace accel::partial_conv2d

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def("partial_conv2d(Tensor x, Tensor weight, Tensor? bias, int dim_conv) -> Tensor");
  // In place, for inference: channels [0, dim_conv) of x replaced by their convolution.
  m.def("partial_conv2d_(Tensor(a!) x, Tensor weight, Tensor? bias, int dim_conv) -> ()");
  m.def(
      "partial_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int dim_conv, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

// Inference only: called on tensors that require grad, the op raises instead of leaving gradients unset.
TORCH_LIBRARY_IMPL(accel, Autograd, m) {
  m.impl("partial_conv2d_", torch::autograd::autogradNotImplementedFallback());
}
