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

#include "common/checks.h"
#include "streaming_conv1d/streaming_conv1d.h"

namespace accel::streaming_conv1d {
namespace {

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

}  // namespace

std::vector<Geometry> check_stack(const at::Tensor& x, at::TensorList states, at::TensorList weights,
                                  const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef dilations,
                                  at::IntArrayRef groups, c10::string_view activation, bool residual,
                                  const std::optional<at::Tensor>& state_indices,
                                  const std::optional<at::Tensor>& positions) {
  const size_t n = states.size();
  TORCH_CHECK_VALUE(n >= 1, kStackOp, ": states must hold at least one layer's state, got none");
  TORCH_CHECK_VALUE(weights.size() == n && biases.size() == n && dilations.size() == n && groups.size() == n,
                    kStackOp, ": states, weights, biases, dilations and groups must have one entry per layer, got ",
                    n, ", ", weights.size(), ", ", biases.size(), ", ", dilations.size(), " and ", groups.size());
  TORCH_CHECK_VALUE(x.dim() == 3, kStackOp, ": x must be (B, C_in, h), got ", x.sizes());
  // Layer i's input is x or, past the first, a stand-in of the previous layer's output shape (no
  // memory), so no state moves when a later layer's arguments are wrong.
  const std::string act(activation);
  std::vector<Geometry> geometry;
  geometry.reserve(n);
  int64_t channels = x.size(1);
  at::Tensor stand_in;
  for (size_t i = 0; i < n; ++i) {
    if (i > 0 && (!stand_in.defined() || stand_in.size(1) != channels)) {
      stand_in = at::empty_strided({x.size(0), channels, x.size(2)}, {0, 0, 0}, x.options());
    }
    const at::Tensor& in = i == 0 ? x : stand_in;
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
    geometry.push_back(g);
  }
  if (positions.has_value() && positions->defined()) {
    const at::Tensor& pos = *positions;
    check_dtype(kStackOp, "positions", pos, at::kLong, "int64");
    check_same_device(kStackOp, "positions", pos, x, "x");
    TORCH_CHECK_VALUE(pos.dim() == 1 && pos.size(0) == geometry.front().slots && pos.is_contiguous(), kStackOp,
                      ": positions must be a contiguous (S,) = (", geometry.front().slots,
                      ",) tensor (S = states[0].size(0)), got shape ", shape_str(pos), " and strides ", pos.strides());
    for (size_t i = 1; i < n; ++i) {
      TORCH_CHECK_VALUE(geometry[i].slots == geometry.front().slots, kStackOp, ": with positions every state needs ",
                        "the same number of slots, but states[0] has ", geometry.front().slots, " and states[", i,
                        "] has ", geometry[i].slots);
    }
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(!pos.storage().is_alias_of(states[i].storage()), kStackOp, ": positions shares memory with ",
                        "states[", i, "]; pass separate tensors");
    }
    if (pos.is_cpu()) {
      const int64_t* p = pos.const_data_ptr<int64_t>();
      for (int64_t s = 0; s < pos.size(0); ++s) {
        TORCH_CHECK_VALUE(p[s] >= 0, kStackOp, ": positions[", s, "] = ", p[s], " must be >= 0");
      }
    }
  }
  return geometry;
}

at::Tensor run_stack_by_layer(const at::Tensor& x, at::TensorList states, at::TensorList weights,
                              const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef dilations,
                              at::IntArrayRef groups, c10::string_view activation, bool residual,
                              const std::optional<at::Tensor>& state_indices,
                              const std::optional<at::Tensor>& positions) {
  static const auto layer_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("accel::streaming_conv1d", "").typed<LayerOp>();
  const bool ring = positions.has_value() && positions->defined();
  at::Tensor advanced;  // positions after the step: + h for the slots of live rows (no host sync)
  if (ring) {
    const at::Tensor& pos = *positions;
    if (state_indices.has_value() && state_indices->defined()) {
      const at::Tensor idx = state_indices->to(at::kLong);
      advanced = pos.clone().scatter_add_(0, idx.clamp_min(0), idx.ge(0).to(at::kLong) * x.size(2));
    } else {
      advanced = pos + x.size(2);
    }
  }
  // slot s's ring as a linear (S, C, L_s) gather index: sample j at (p[s] + j) % L_s
  auto ring_index = [](const at::Tensor& p, const at::Tensor& state) {
    const int64_t ls = state.size(2);
    const at::Tensor j = at::arange(ls, p.options());
    return (p.unsqueeze(1) + j).remainder(ls).unsqueeze(1).expand({state.size(0), state.size(1), ls});
  };
  at::Tensor h = x;
  for (size_t i = 0; i < states.size(); ++i) {
    const bool gather = ring && states[i].size(2) > 0;
    const at::Tensor state = gather ? states[i].gather(2, ring_index(*positions, states[i])) : states[i];
    at::Tensor y = layer_op.call(h, state, weights[i], biases.get(i), dilations[i], groups[i], activation,
                                 state_indices);
    if (gather) states[i].scatter_(2, ring_index(advanced, states[i]), state);
    if (residual) y.add_(h);
    h = y;
  }
  if (ring) positions->copy_(advanced);
  return h;
}

namespace {

at::Tensor streaming_conv1d_stack(const at::Tensor& x, at::TensorList states, at::TensorList weights,
                                  const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef dilations,
                                  at::IntArrayRef groups, c10::string_view activation, bool residual,
                                  const std::optional<at::Tensor>& state_indices,
                                  const std::optional<at::Tensor>& positions) {
  check_stack(x, states, weights, biases, dilations, groups, activation, residual, state_indices, positions);
  return run_stack_by_layer(x, states, weights, biases, dilations, groups, activation, residual, state_indices,
                            positions);
}

}  // namespace
}  // namespace accel::streaming_conv1d

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def(
      "streaming_conv1d_stack(Tensor x, Tensor(a!)[] states, Tensor[] weights, Tensor?[] biases, int[] dilations, "
      "int[] groups, str activation, bool residual, Tensor? state_indices, Tensor(b!)? positions=None) -> Tensor");
}

// Every backend without its own kernel (the CPU has one): each layer dispatches to that backend's kernel.
TORCH_LIBRARY_IMPL(accel, CompositeExplicitAutograd, m) {
  m.impl("streaming_conv1d_stack", &accel::streaming_conv1d::streaming_conv1d_stack);
}

// No derivative: accel.ops.streaming_conv1d_stack differentiates layer by layer.
TORCH_LIBRARY_IMPL(accel, Autograd, m) {
  m.impl("streaming_conv1d_stack", torch::autograd::autogradNotImplementedFallback());
}
