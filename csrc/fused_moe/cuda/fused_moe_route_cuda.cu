// CUDA backend of accel::moe_route and moe_route_backward: top-k expert selection (softmax or
// sigmoid scoring, optional renormalisation) and its gradient, one warp per token. Ids outside
// [0, E) in the backward are skipped (zero gradient).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "fused_moe/fused_moe.h"

namespace accel::fused_moe::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------ routing

// Routing maths runs in acc_t: float, or double for float64 logits (whose weights are float64).
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// Robust sigmoid: exp of a non-positive argument only, nothing overflows.
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_acc(acc_t x) {
  const acc_t e = exp_acc(-fabs(x));
  const acc_t r = acc_t(1) / (acc_t(1) + e);
  return x >= acc_t(0) ? r : e * r;
}

// The total order of the top-k: larger score first, NaN above everything (as torch.topk), ties to
// the lower expert id.
template <typename acc_t>
__device__ __forceinline__ bool ranks_before(acc_t a, int ea, acc_t b, int eb) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ea < eb;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

constexpr int kRouteWarps = 4;

// Softmax statistics of one row (max, 1 / sum exp(x - max)), every lane gets them.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void softmax_stats(const scalar_t* row, int experts, int lane, acc_t& mx, acc_t& inv) {
  acc_t m = -INFINITY;
  for (int e = lane; e < experts; e += 32) m = fmax(m, static_cast<acc_t>(row[e]));
  mx = warp_max(m);
  acc_t s = 0;
  for (int e = lane; e < experts; e += 32) s += exp_acc(static_cast<acc_t>(row[e]) - mx);
  inv = acc_t(1) / warp_sum(s);
}

// One warp per token. The s-th selection is the best score strictly after the (s-1)-th in the
// total order, so nothing has to be marked and every score is recomputed identically.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRouteWarps * 32)
    route_kernel(const scalar_t* __restrict__ logits, int64_t tokens, int experts, int top_k, bool renormalize,
                 bool softmax, acc_t* __restrict__ weights, int64_t* __restrict__ ids) {
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + threadIdx.x / 32;
  if (t >= tokens) return;  // whole warps leave together
  const scalar_t* row = logits + t * experts;
  acc_t mx = 0, inv = 1;
  if (softmax) softmax_stats(row, experts, lane, mx, inv);
  acc_t* w_out = weights + t * top_k;
  int64_t* id_out = ids + t * top_k;
  acc_t prev_s = 0, total = 0;
  int prev_e = -1;
  for (int s = 0; s < top_k; ++s) {
    acc_t best_s = 0;
    int best_e = -1;
    for (int e = lane; e < experts; e += 32) {
      const acc_t x = static_cast<acc_t>(row[e]);
      const acc_t v = softmax ? exp_acc(x - mx) * inv : sigmoid_acc(x);
      if (prev_e >= 0 && !ranks_before(prev_s, prev_e, v, e)) continue;
      if (best_e < 0 || ranks_before(v, e, best_s, best_e)) {
        best_s = v;
        best_e = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      const acc_t os = __shfl_xor_sync(kFullMask, best_s, o);
      const int oe = __shfl_xor_sync(kFullMask, best_e, o);
      if (oe >= 0 && (best_e < 0 || ranks_before(os, oe, best_s, best_e))) {
        best_s = os;
        best_e = oe;
      }
    }
    if (lane == 0) {
      w_out[s] = best_s;
      id_out[s] = best_e;
    }
    total += best_s;
    prev_s = best_s;
    prev_e = best_e;
  }
  if (renormalize) {
    __syncwarp();
    const acc_t r = acc_t(1) / total;
    for (int s = lane; s < top_k; s += 32) w_out[s] *= r;
  }
}

// d router_logits from d topk_weights (formulas in fused_moe.h / the op docs). One warp per token:
// first every logit gets its value as if not kept, then the kept ones are overwritten.
template <typename scalar_t, typename acc_t, typename id_t>
__global__ void __launch_bounds__(kRouteWarps * 32)
    route_backward_kernel(const acc_t* __restrict__ grad_w, const scalar_t* __restrict__ logits,
                          const acc_t* __restrict__ topk_w, const id_t* __restrict__ topk_ids, int64_t tokens,
                          int experts, int top_k, bool renormalize, bool softmax, scalar_t* __restrict__ grad_logits) {
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + threadIdx.x / 32;
  if (t >= tokens) return;
  const scalar_t* row = logits + t * experts;
  scalar_t* out = grad_logits + t * experts;
  const acc_t* g = grad_w + t * top_k;
  const acc_t* w = topk_w + t * top_k;
  const id_t* id = topk_ids + t * top_k;
  auto valid = [&](id_t e) { return e >= 0 && e < static_cast<id_t>(experts); };

  acc_t dot = 0, kept_sum = 0;  // sum_s w_s g_s, and (sigmoid + renorm) S = sum_kept p
  for (int j = lane; j < top_k; j += 32) {
    if (!valid(id[j])) continue;
    dot += w[j] * g[j];
    if (!softmax && renormalize) kept_sum += sigmoid_acc(static_cast<acc_t>(row[id[j]]));
  }
  dot = warp_sum(dot);
  kept_sum = warp_sum(kept_sum);

  acc_t mx = 0, inv = 1;
  const bool dense = softmax && !renormalize;  // every logit gets a gradient
  if (dense) softmax_stats(row, experts, lane, mx, inv);
  for (int e = lane; e < experts; e += 32) {
    const acc_t v = dense ? -exp_acc(static_cast<acc_t>(row[e]) - mx) * inv * dot : acc_t(0);
    out[e] = static_cast<scalar_t>(v);
  }
  __syncwarp();
  for (int j = lane; j < top_k; j += 32) {
    const id_t e = id[j];
    if (!valid(e)) continue;
    const acc_t x = static_cast<acc_t>(row[e]);
    acc_t v;
    if (softmax) {
      // renorm: w = softmax over the kept logits; else w = p (the full softmax)
      v = renormalize ? w[j] * (g[j] - dot) : exp_acc(x - mx) * inv * (g[j] - dot);
    } else {
      const acc_t pr = sigmoid_acc(x);
      const acc_t dp = renormalize ? (g[j] - dot) / kept_sum : g[j];
      v = dp * pr * (acc_t(1) - pr);
    }
    out[e] = static_cast<scalar_t>(v);
  }
}

// ------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& router_logits, int64_t top_k, bool renormalize,
                                                  c10::string_view scoring) {
  check_route(router_logits, top_k);
  const Scoring sc = parse_scoring(std::string(scoring));
  TORCH_CHECK(router_logits.is_cuda(), kRouteOp, ": router_logits must be a CUDA tensor here, got ",
              router_logits.device());
  TORCH_CHECK(router_logits.size(1) < std::numeric_limits<int>::max(), kRouteOp, ": too many experts");
  c10::cuda::CUDAGuard guard(router_logits.device());
  const at::Tensor logits = router_logits.contiguous();
  const int64_t tokens = logits.size(0);
  const int experts = static_cast<int>(logits.size(1));
  // float32 weights (as transformers' routers give them), float64 for float64 logits
  const bool fp64 = logits.scalar_type() == at::kDouble;
  at::Tensor weights = at::empty({tokens, top_k}, logits.options().dtype(fp64 ? at::kDouble : at::kFloat));
  at::Tensor ids = at::empty({tokens, top_k}, logits.options().dtype(at::kLong));
  if (tokens == 0) return {weights, ids};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((tokens + kRouteWarps - 1) / kRouteWarps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    route_kernel<scalar_t, acc_t><<<blocks, kRouteWarps * 32, 0, stream>>>(
        logits.data_ptr<scalar_t>(), tokens, experts, static_cast<int>(top_k), renormalize, sc == Scoring::Softmax,
        weights.data_ptr<acc_t>(), ids.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, ids};
}

at::Tensor moe_route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& router_logits,
                                   const at::Tensor& topk_weights, const at::Tensor& topk_ids, bool renormalize,
                                   c10::string_view scoring) {
  const Scoring sc = check_route_backward(grad_weights, router_logits, topk_weights, topk_ids, scoring);
  const int64_t tokens = router_logits.size(0), top_k = topk_ids.size(1);
  c10::cuda::CUDAGuard guard(router_logits.device());
  const at::Tensor logits = router_logits.contiguous();
  // the maths in float32, float64 for float64 logits (as the forward)
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_weights.to(acc).contiguous(), w = topk_weights.to(acc).contiguous();
  const at::Tensor ids = topk_ids.contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  if (tokens == 0) return grad;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((tokens + kRouteWarps - 1) / kRouteWarps);
  const int experts = static_cast<int>(logits.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_backward_cuda", [&] {
    using scalar = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moe_route_backward_cuda_ids", [&] {
      route_backward_kernel<scalar, acc_t, index_t><<<blocks, kRouteWarps * 32, 0, stream>>>(
          g.data_ptr<acc_t>(), logits.data_ptr<scalar>(), w.data_ptr<acc_t>(), ids.data_ptr<index_t>(), tokens,
          experts, static_cast<int>(top_k), renormalize, sc == Scoring::Softmax, grad.data_ptr<scalar>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace
}  // namespace accel::fused_moe::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) {
  m.impl("moe_route", &accel::fused_moe::cuda::moe_route_cuda);
  m.impl("moe_route_backward", &accel::fused_moe::cuda::moe_route_backward_cuda);
}
