// Schema and argument checks for accel::streaming_conv1d. Kernels live in cpu/ and cuda/ and
// register themselves, so a CPU-only build has the same schema.
#include "streaming_conv1d/streaming_conv1d.h"

#include <ATen/MemoryOverlap.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"

namespace accel::streaming_conv1d {

Geometry check(const at::Tensor& x, const at::Tensor& state, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, int64_t dilation, int64_t groups, const std::string& activation,
               const c10::optional<at::Tensor>& state_indices) {
  check_dim(kOp, "x", x, 3, "(B, C_in, h)");
  check_dim(kOp, "state", state, 3, "(S, C_in, L_s)");
  check_dim(kOp, "weight", weight, 3, "(C_out, C_in / groups, K)");
  check_floating(kOp, "x", x);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"state", state}, {"weight", weight}}) {
    check_same_dtype(kOp, name, t, x, "x");
    check_same_device(kOp, name, t, x, "x");
  }
  TORCH_CHECK_VALUE(groups >= 1, kOp, ": groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(dilation >= 1, kOp, ": dilation must be >= 1, got ", dilation);
  Geometry g{};
  g.act = parse_activation(activation, kOp);
  g.batch = x.size(0);
  g.c_in = x.size(1);
  g.chunk = x.size(2);
  g.c_out = weight.size(0);
  g.kernel = weight.size(2);
  g.dilation = dilation;
  g.groups = groups;
  g.slots = state.size(0);
  g.state_len = state.size(2);
  TORCH_CHECK_VALUE(g.kernel >= 1, kOp, ": kernel size (weight.size(2)) must be >= 1, got weight shape ",
                    shape_str(weight));
  TORCH_CHECK_VALUE(g.c_in % groups == 0, kOp, ": groups=", groups, " must divide the input channels C_in=", g.c_in,
                    " (x.size(1))");
  TORCH_CHECK_VALUE(g.c_out % groups == 0, kOp, ": groups=", groups, " must divide the output channels C_out=", g.c_out,
                    " (weight.size(0))");
  g.c_in_per_group = g.c_in / groups;
  g.c_out_per_group = g.c_out / groups;
  TORCH_CHECK_VALUE(weight.size(1) == g.c_in_per_group, kOp, ": weight must have shape (C_out, C_in / groups, K) = (",
                    g.c_out, ", ", g.c_in_per_group, ", K) for x with C_in=", g.c_in, " and groups=", groups,
                    ", got ", shape_str(weight));
  g.span = (g.kernel - 1) * dilation;
  TORCH_CHECK_VALUE(state.size(1) == g.c_in, kOp, ": state must have shape (S, C_in, L_s) with C_in=", g.c_in,
                    " (x.size(1)), got ", shape_str(state));
  TORCH_CHECK_VALUE(g.state_len >= g.span, kOp, ": state must hold at least (K-1)*dilation = ", g.span,
                    " samples (K=", g.kernel, ", dilation=", dilation, "), got shape ", shape_str(state));
  TORCH_CHECK_VALUE(state.is_contiguous(), kOp, ": state must be contiguous (it is updated in place), got strides ",
                    state.strides(), " for shape ", shape_str(state));
  // The state is written while the other inputs are read.
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"weight", weight}}) {
    TORCH_CHECK_VALUE(!shares_memory(t, state), kOp, ": ", name,
                      " shares memory with state, which the op writes; pass a copy");
  }
  if (bias.has_value() && bias->defined()) {
    check_dim(kOp, "bias", *bias, 1, "(C_out,)");
    TORCH_CHECK_VALUE(bias->size(0) == g.c_out, kOp, ": bias must have shape (", g.c_out, ",), got ", shape_str(*bias));
    check_same_dtype(kOp, "bias", *bias, x, "x");
    check_same_device(kOp, "bias", *bias, x, "x");
    TORCH_CHECK_VALUE(!shares_memory(*bias, state), kOp,
                      ": bias shares memory with state, which the op writes; pass a copy");
  }
  if (state_indices.has_value() && state_indices->defined()) {
    const at::Tensor& idx = *state_indices;
    check_dtype(kOp, "state_indices", idx, at::kInt, "int32");
    TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == g.batch, kOp, ": state_indices must have shape (B,) = (",
                      g.batch, ",), got ", shape_str(idx));
    TORCH_CHECK_VALUE(idx.is_contiguous(), kOp, ": state_indices must be contiguous, got strides ", idx.strides());
    check_same_device(kOp, "state_indices", idx, x, "x");
    if (idx.is_cpu()) {
      const int32_t* s = idx.const_data_ptr<int32_t>();
      std::vector<int64_t> owner(g.slots, -1);
      for (int64_t b = 0; b < g.batch; ++b) {
        TORCH_CHECK_VALUE(s[b] >= -1 && s[b] < g.slots, kOp, ": state_indices[", b, "] = ", s[b],
                          " is outside [-1, ", g.slots, ") (-1 marks a padding row; the state has ", g.slots,
                          " slots)");
        if (s[b] < 0) continue;
        TORCH_CHECK_VALUE(owner[s[b]] < 0, kOp, ": state_indices[", owner[s[b]], "] and state_indices[", b,
                          "] both name slot ", s[b], "; each slot may appear once");
        owner[s[b]] = b;
      }
    }
  } else {
    TORCH_CHECK_VALUE(g.slots == g.batch, kOp, ": without state_indices the state must have one slot per row: state.size(0)=",
                      g.slots, " but x.size(0)=", g.batch);
  }
  return g;
}

}  // namespace accel::streaming_conv1d

TORCH_LIBRARY_FRAGMENT(accel, m) {
  // The schema declares the in-place write of state, so torch.compile functionalises the op correctly.
  m.def(
      "streaming_conv1d(Tensor x, Tensor(a!) state, Tensor weight, Tensor? bias, int dilation, int groups, "
      "str activation, Tensor? state_indices) -> Tensor");
}

// No derivative: accel.ops.streaming_conv1d differentiates through dilated_conv1d. Called directly
// on inputs that require grad, the op's backward raises instead of leaving gradients silently unset.
TORCH_LIBRARY_IMPL(accel, Autograd, m) {
  m.impl("streaming_conv1d", torch::autograd::autogradNotImplementedFallback());
}
