// accel::streaming_conv1d_stack: one chunk through a stack of streaming convolutions (a TCN's layers)
// in one call, so that a step pays the Python and dispatcher cost once instead of once per layer.
// Every layer runs the backend's accel::streaming_conv1d kernel; with `residual`, each layer's input
// is added to its output. Every layer's arguments are checked before any state is written.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "streaming_conv1d/streaming_conv1d.h"

namespace accel::streaming_conv1d {
namespace {

constexpr const char* kStackOp = "streaming_conv1d_stack";

using LayerOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           int64_t, int64_t, c10::string_view, const std::optional<at::Tensor>&);

// The layer's checks (streaming_conv1d's), their messages prefixed with the layer.
Geometry check_layer(size_t layer, const at::Tensor& x, const at::Tensor& state, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t dilation, int64_t groups,
                     const std::string& activation, const std::optional<at::Tensor>& state_indices) {
  try {
    return check(x, state, weight, bias, dilation, groups, activation, state_indices);
  } catch (const c10::TypeError& e) {
    TORCH_CHECK_TYPE(false, kStackOp, ": layer ", layer, ": ", e.msg());
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, kStackOp, ": layer ", layer, ": ", e.msg());
  }
}

at::Tensor streaming_conv1d_stack(const at::Tensor& x, at::TensorList states, at::TensorList weights,
                                  const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef dilations,
                                  at::IntArrayRef groups, c10::string_view activation, bool residual,
                                  const std::optional<at::Tensor>& state_indices) {
  const size_t n = states.size();
  TORCH_CHECK_VALUE(n >= 1, kStackOp, ": states must hold at least one layer's state, got none");
  TORCH_CHECK_VALUE(weights.size() == n && biases.size() == n && dilations.size() == n && groups.size() == n,
                    kStackOp, ": states, weights, biases, dilations and groups must have one entry per layer, got ",
                    n, ", ", weights.size(), ", ", biases.size(), ", ", dilations.size(), " and ", groups.size());
  TORCH_CHECK_VALUE(x.dim() == 3, kStackOp, ": x must be (B, C_in, h), got ", x.sizes());
  // Checks of every layer first: its input is x or, past the first, a stand-in of the previous
  // layer's output shape (no memory), so no state moves when a later layer's arguments are wrong.
  const std::string act(activation);
  int64_t channels = x.size(1);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor in = i == 0 ? x : at::empty_strided({x.size(0), channels, x.size(2)}, {0, 0, 0}, x.options());
    const std::optional<at::Tensor> bias = biases.get(i);
    const Geometry g = check_layer(i, in, states[i], weights[i], bias, dilations[i], groups[i], act, state_indices);
    TORCH_CHECK_VALUE(!residual || g.c_out == g.c_in, kStackOp, ": layer ", i, " maps ", g.c_in, " channels to ",
                      g.c_out, "; a residual stack keeps the channel count");
    channels = g.c_out;
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(!states[j].storage().is_alias_of(states[i].storage()) ||
                            at::get_overlap_status(states[j], states[i]) == at::MemOverlapStatus::No,
                        kStackOp, ": the states of layers ", j, " and ", i, " share memory; each layer needs its own");
    }
  }
  static const auto layer_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("accel::streaming_conv1d", "").typed<LayerOp>();
  at::Tensor h = x;
  for (size_t i = 0; i < n; ++i) {
    at::Tensor y = layer_op.call(h, states[i], weights[i], biases.get(i), dilations[i], groups[i], activation,
                                 state_indices);
    if (residual) y.add_(h);
    h = y;
  }
  return h;
}

}  // namespace
}  // namespace accel::streaming_conv1d

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def(
      "streaming_conv1d_stack(Tensor x, Tensor(a!)[] states, Tensor[] weights, Tensor?[] biases, int[] dilations, "
      "int[] groups, str activation, bool residual, Tensor? state_indices) -> Tensor");
}

// One implementation for every backend: each layer dispatches to that backend's kernel.
TORCH_LIBRARY_IMPL(accel, CompositeExplicitAutograd, m) {
  m.impl("streaming_conv1d_stack", &accel::streaming_conv1d::streaming_conv1d_stack);
}

// No derivative: accel.ops.streaming_conv1d_stack differentiates layer by layer.
TORCH_LIBRARY_IMPL(accel, Autograd, m) {
  m.impl("streaming_conv1d_stack", torch::autograd::autogradNotImplementedFallback());
}
