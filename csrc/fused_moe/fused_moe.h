// Fused mixture-of-experts: shared declarations for the schema file and the backends.
//
//   out[t] = sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)),   e = ids[t, j]
//
//   hidden        x  (T, H)
//   gate_up_proj  W1 (E, 2I, H)   rows [0, I) the gate, rows [I, 2I) the up projection
//   down_proj     W2 (E, H, I)
//   topk_weights  w  (T, k)       float32 or the hidden dtype
//   topk_ids      ids (T, k)      int32 or int64, each in [0, E)
//
// A (token, slot) pair p = t * k + j is routed to expert ids[t, j]. The kernels sort the pairs by
// expert (a counting sort: per-expert counts, offsets and the permutation), run each expert's
// pairs as one GEMM (gate and up together, the activation-and-multiply in the epilogue), the down
// projection into one row per pair scaled by its weight, and reduce each token's k rows (no
// atomics on the CPU).
//
// Backward, with g = gate and u = up pre-activations of pair p (saved by the forward as `cache`,
// (T k, 2I) in pair order) and h = act(g) u:
//   z_p   = W2[e]^T dout_t            (I)
//   dw_tj = z_p . h_p
//   dh_p  = w_tj z_p,  dg = dh u act'(g),  du = dh act(g)
//   dx_t  = sum_j W1[e]^T [dg; du],   dW1[e] = sum_p [dg; du] x_t^T,   dW2[e] = sum_p w_tj dout_t h_p^T
//
// Routing (moe_route): scores = softmax(logits) or sigmoid(logits) in float32 (float64 for float64
// logits, and the weights then are float64 too); the k largest are
// kept (ties: the lower expert id first), optionally renormalised to sum to 1. moe_route_backward
// maps d topk_weights to d router_logits.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "common/activation.h"

namespace accel::fused_moe {

constexpr const char* kOp = "fused_moe";
constexpr const char* kRouteOp = "moe_route";

enum class Scoring : int { Softmax = 0, Sigmoid = 1 };

struct Geometry {
  int64_t tokens = 0, hidden = 0, inter = 0, experts = 0, top_k = 0;
};

Scoring parse_scoring(const std::string& name);

// Checks shapes, dtypes and devices of the forward's arguments (not the id values: each backend
// checks those where it reads them) and returns the sizes.
Geometry check_forward(const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                       const at::Tensor& topk_weights, const at::Tensor& topk_ids);

// The backward's extra arguments: grad_out (T, H) in the hidden dtype, cache (T k, 2I).
Geometry check_backward(const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                        const at::Tensor& down_proj, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                        const at::Tensor& cache);

void check_route(const at::Tensor& router_logits, int64_t top_k);

// Checks the arguments of accel::moe_route_backward (shapes (T, k), dtypes, devices, scoring) and
// returns the scoring; both backends call it before reading any value.
Scoring check_route_backward(const at::Tensor& grad_weights, const at::Tensor& router_logits,
                             const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view scoring);

}  // namespace accel::fused_moe
