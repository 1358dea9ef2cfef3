// Schema and argument checks for accel::partial_conv2d. Kernels live in cpu/ and register
// themselves, so every build has the same schema.
#include "partial_conv2d/partial_conv2d.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "common/checks.h"

namespace accel::partial_conv2d {

namespace {

// A per-plane tensor of op: (B, C - Cp), x's dtype and device.
void check_planes(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, const Geometry& g) {
  check_dim(op, name, t, 2, "(B, C - Cp)");
  TORCH_CHECK_VALUE(t.size(0) == g.batch && t.size(1) == g.channels - g.cp, op, ": ", name,
                    " must have shape (B, C - Cp) = (", g.batch, ", ", g.channels - g.cp, "), got ", shape_str(t));
  check_same_dtype(op, name, t, x, "x");
  check_same_device(op, name, t, x, "x");
}

void check_per_plane(const char* name, const OptTensor& t, const at::Tensor& x, const Geometry& g) {
  if (given(t)) check_planes(kOp, name, *t, x, g);
}

at::Tensor per_plane(const at::Tensor& t) { return t.unsqueeze(-1).unsqueeze(-1); }

}  // namespace

Geometry check_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, int64_t dim_conv,
                       const OptTensor& scale, const OptTensor& shift) {
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
  check_per_plane("scale", scale, x, g);
  check_per_plane("shift", shift, x, g);
  return g;
}

Geometry check_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const OptTensor& bias, int64_t dim_conv, const OptTensor& scale, const OptTensor& shift) {
  const Geometry g = check_forward(x, weight, bias, dim_conv, scale, shift);
  check_dim(kOp, "grad_out", grad_out, 4, "(B, C, H, W)");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), kOp, ": grad_out must have x's shape ", shape_str(x), ", got ",
                    shape_str(grad_out));
  check_same_dtype(kOp, "grad_out", grad_out, x, "x");
  check_same_device(kOp, "grad_out", grad_out, x, "x");
  return g;
}

Geometry check_inplace(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, int64_t dim_conv,
                       const OptTensor& scale, const OptTensor& shift) {
  const Geometry g = check_forward(x, weight, bias, dim_conv, scale, shift);
  TORCH_CHECK_VALUE(!shares_memory(weight, x), kOp, "_: weight shares memory with x, which the op writes; pass a copy");
  TORCH_CHECK_VALUE(!(bias.has_value() && bias->defined() && shares_memory(*bias, x)), kOp,
                    "_: bias shares memory with x, which the op writes; pass a copy");
  TORCH_CHECK_VALUE(!(given(scale) && shares_memory(*scale, x)), kOp,
                    "_: scale shares memory with x, which the op writes; pass a copy");
  TORCH_CHECK_VALUE(!(given(shift) && shares_memory(*shift, x)), kOp,
                    "_: shift shares memory with x, which the op writes; pass a copy");
  return g;
}

at::Tensor empty_like_output(const at::Tensor& x) {
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return at::empty(x.sizes(), x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
}

void untouched_into(const at::Tensor& in, int64_t cp, const OptTensor& scale, const OptTensor& shift,
                    const at::Tensor& out) {
  const int64_t rest = in.size(1) - cp;
  if (rest == 0 || in.numel() == 0) return;
  const at::Tensor src = in.narrow(1, cp, rest);
  at::Tensor dst = out.narrow(1, cp, rest);
  // TensorIterator passes: one read of src, one write of dst, any layouts (dst may be src, in place)
  if (given(scale) && given(shift)) {
    at::addcmul_out(dst, per_plane(*shift), src, per_plane(*scale));
  } else if (given(scale)) {
    at::mul_out(dst, src, per_plane(*scale));
  } else if (given(shift)) {
    at::add_out(dst, src, per_plane(*shift));
  } else {
    dst.copy_(src);
  }
}

Geometry check_stats(const at::Tensor& x, int64_t dim_conv) {
  check_dim(kStatsOp, "x", x, 4, "(B, C, H, W)");
  check_floating(kStatsOp, "x", x);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), dim_conv};
  TORCH_CHECK_VALUE(dim_conv >= 0 && dim_conv <= g.channels, kStatsOp,
                    ": dim_conv (the convolved channels, Cp) must be in [0, ", g.channels, "] for x with C=",
                    g.channels, " channels, got ", dim_conv);
  return g;
}

Geometry check_stats_backward(const at::Tensor& grad_mean, const at::Tensor& grad_std, const at::Tensor& x,
                              const at::Tensor& mean, const at::Tensor& std, int64_t dim_conv) {
  const Geometry g = check_stats(x, dim_conv);
  const std::pair<const char*, const at::Tensor*> args[] = {
      {"grad_mean", &grad_mean}, {"grad_std", &grad_std}, {"mean", &mean}, {"std", &std}};
  for (const auto& [name, t] : args) check_planes(kStatsOp, name, *t, x, g);
  return g;
}

// grad_x of the statistics: 0 for c < Cp, else x * alpha + beta per (b, c) plane with
//   alpha = grad_std / ((N - 1) std),  beta = grad_mean / N - mean * alpha
// (coefficients in the accumulation type on x's device, then one ATen pass over x).
at::Tensor partial_conv2d_stats_backward(const at::Tensor& grad_mean, const at::Tensor& grad_std,
                                         const at::Tensor& x, const at::Tensor& mean, const at::Tensor& std,
                                         int64_t dim_conv) {
  check_stats_backward(grad_mean, grad_std, x, mean, std, dim_conv);
  const auto acc = at::toOpMathType(x.scalar_type());
  const double n = static_cast<double>(x.size(2) * x.size(3));
  const at::Tensor s = std.to(acc);
  // d std / d x = (x - mean) / ((N - 1) std), taken as 0 where std is 0 (as torch.std's backward)
  const at::Tensor alpha = (grad_std.to(acc) / (s * (n - 1))).masked_fill_(s == 0, 0);
  const at::Tensor beta = grad_mean.to(acc) / n - mean.to(acc) * alpha;
  at::Tensor grad_x = empty_like_output(x);
  if (grad_x.numel() == 0) return grad_x;
  if (dim_conv > 0) grad_x.narrow(1, 0, dim_conv).zero_();
  untouched_into(x, dim_conv, alpha, beta, grad_x);
  return grad_x;
}

}  // namespace accel::partial_conv2d

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def(
      "partial_conv2d(Tensor x, Tensor weight, Tensor? bias, int dim_conv, Tensor? scale=None, "
      "Tensor? shift=None) -> Tensor");
  // In place, for inference: channels [0, dim_conv) of x replaced by their convolution, the others
  // scaled and shifted.
  m.def(
      "partial_conv2d_(Tensor(a!) x, Tensor weight, Tensor? bias, int dim_conv, Tensor? scale=None, "
      "Tensor? shift=None) -> ()");
  m.def(
      "partial_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, int dim_conv, "
      "Tensor? scale, Tensor? shift, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // PAT_ch's per-channel (mean, std) of the channels from dim_conv on.
  m.def("partial_conv2d_stats(Tensor x, int dim_conv) -> (Tensor, Tensor)");
  m.def(
      "partial_conv2d_stats_backward(Tensor grad_mean, Tensor grad_std, Tensor x, Tensor mean, Tensor std, "
      "int dim_conv) -> Tensor");
}

// Device-generic: coefficients on (B, C - Cp), then one ATen pass over x.
TORCH_LIBRARY_IMPL(accel, CompositeExplicitAutograd, m) {
  m.impl("partial_conv2d_stats_backward", &accel::partial_conv2d::partial_conv2d_stats_backward);
}

// Inference only: called on tensors that require grad, the op raises instead of leaving gradients unset.
TORCH_LIBRARY_IMPL(accel, Autograd, m) {
  m.impl("partial_conv2d_", torch::autograd::autogradNotImplementedFallback());
}
