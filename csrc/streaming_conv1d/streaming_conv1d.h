// Streaming 1-D convolution: shared declarations for the schema file and the backends.
//
// With s = state_indices[b] (b when absent), P = (K-1)*dilation and u = cat(state[s], x[b]) along
// time (length L_s + h):
//   y[b, co, t] = act(bias[co] + sum_{ci in group(co), k} w[co, ci, k] * u[ci, L_s + t - (K-1-k)*dilation])
//   state[s]   <- u[:, h : h + L_s]
// u is never materialised: the kernels read the state and the chunk where they lie. A row with
// s = -1 is padding: its output is zero and no state is touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

#include "common/activation.h"

namespace accel::streaming_conv1d {

constexpr const char* kOp = "streaming_conv1d";

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

}  // namespace accel::streaming_conv1d
