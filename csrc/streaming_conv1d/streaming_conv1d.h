// Streaming 1-D convolution: shared declarations for the schema file and the backends.
//
// With s = state_indices[b] (b when absent), P = (K-1)*dilation and u = cat(state[s], x[b]) along
// time (length L_s + h):
//   y[b, co, t] = act(bias[co] + sum_{ci in group(co), k} w[co, ci, k] * u[ci, L_s + t - (K-1-k)*dilation])
//   state[s]   <- u[:, h : h + L_s]
// u is never materialised: the kernels read the state and the chunk where they lie. A row with
// s = -1 is padding: its output is zero and no state is touched.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "common/activation.h"

namespace accel::streaming_conv1d {

constexpr const char* kOp = "streaming_conv1d";
constexpr const char* kStackOp = "streaming_conv1d_stack";

struct Geometry {
  int64_t batch, c_in, c_out, chunk, kernel, dilation, groups, c_in_per_group, c_out_per_group;
  int64_t slots, state_len, span;  // span = (K-1)*dilation <= state_len
  Activation act;
};

// Validates every argument (on the CPU also the values of state_indices: in [-1, S), no slot twice)
// and returns the resolved sizes. Nothing has been written when it throws.
Geometry check(const at::Tensor& x, const at::Tensor& state, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, int64_t dilation, int64_t groups, const std::string& activation,
               const c10::optional<at::Tensor>& state_indices);

// accel::streaming_conv1d_stack: every layer's checks (layer i's input is layer i-1's output, and
// positions, when given: (S,) int64, the same S as every state) and their geometry, before any state
// is written.
//
// With positions, each state is a ring: slot s of layer i holds its last L_s samples, oldest first,
// starting at sample positions[s] % L_s and wrapping around; a step writes the chunk's last samples
// over the oldest and adds h to positions[s], instead of moving the whole row.
std::vector<Geometry> check_stack(const at::Tensor& x, at::TensorList states, at::TensorList weights,
                                  const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef dilations,
                                  at::IntArrayRef groups, c10::string_view activation, bool residual,
                                  const std::optional<at::Tensor>& state_indices,
                                  const std::optional<at::Tensor>& positions);

// The stack run layer by layer through the backend's accel::streaming_conv1d (after check_stack); ring
// states are gathered into linear ones for each layer and scattered back.
at::Tensor run_stack_by_layer(const at::Tensor& x, at::TensorList states, at::TensorList weights,
                              const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef dilations,
                              at::IntArrayRef groups, c10::string_view activation, bool residual,
                              const std::optional<at::Tensor>& state_indices,
                              const std::optional<at::Tensor>& positions);

}  // namespace accel::streaming_conv1d
