// Fused MoE routing on the CPU: moe_route (top-k of the router's scores) and its backward, and
// the routing tables the forward and backward sort the (token, slot) pairs by.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "fused_moe/cpu/fused_moe_cpu.h"

namespace accel::fused_moe::moe_cpu {
namespace {

template <typename id_t>
void fill_routing(const id_t* ids, Routing& r) {
  std::vector<int64_t> count(r.experts + 1, 0);
  for (int64_t p = 0; p < r.pairs; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    TORCH_CHECK(e >= 0 && e < r.experts, kOp, ": topk_ids must be in [0, E) = [0, ", r.experts, "), found ", e,
                " at token ", p / r.top_k, ", slot ", p % r.top_k);
    ++count[e + 1];
  }
  r.offsets.assign(r.experts + 1, 0);
  for (int64_t e = 0; e < r.experts; ++e) r.offsets[e + 1] = r.offsets[e] + count[e + 1];
  std::vector<int64_t> fill(r.offsets.begin(), r.offsets.end() - 1);
  r.order.resize(r.pairs);
  for (int64_t p = 0; p < r.pairs; ++p) r.order[fill[static_cast<int64_t>(ids[p])]++] = p;
}

}  // namespace

Routing make_routing(const at::Tensor& topk_ids, int64_t experts) {
  Routing r;
  r.tokens = topk_ids.size(0);
  r.top_k = topk_ids.size(1);
  r.experts = experts;
  r.pairs = r.tokens * r.top_k;
  const at::Tensor ids = topk_ids.contiguous();
  if (ids.scalar_type() == at::kLong) {
    fill_routing(ids.const_data_ptr<int64_t>(), r);
  } else {
    fill_routing(ids.const_data_ptr<int32_t>(), r);
  }
  return r;
}

namespace {

// The k largest scores of one token, in descending order (ties: the lower expert id first; a NaN
// score never wins over a number, and every slot is filled as E >= k).
template <typename acc_t>
void select_top_k(const acc_t* s, int64_t E, int64_t k, int64_t* ids) {
  for (int64_t j = 0; j < k; ++j) ids[j] = -1;
  for (int64_t e = 0; e < E; ++e) {
    int64_t pos = k;
    while (pos > 0 && (ids[pos - 1] < 0 || s[e] > s[ids[pos - 1]])) --pos;
    if (pos >= k) continue;
    for (int64_t j = k - 1; j > pos; --j) ids[j] = ids[j - 1];
    ids[pos] = e;
  }
}

// Scores in acc_t (float32, or float64 for float64 logits): softmax over the experts or sigmoid.
template <typename T, typename acc_t>
void scores_of(const T* l, int64_t E, Scoring scoring, acc_t* s) {
  if (scoring == Scoring::Softmax) {
    acc_t m = -INFINITY;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<acc_t>(l[e]));
    acc_t sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(static_cast<acc_t>(l[e]) - m));
    for (int64_t e = 0; e < E; ++e) s[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(l[e])));
  }
}

template <typename T, typename acc_t>
void route_impl(const T* logits, int64_t tokens, int64_t E, int64_t k, bool renorm, Scoring scoring, acc_t* w,
                int64_t* ids) {
  at::parallel_for(0, tokens, 16, [&](int64_t b, int64_t end) {
    std::vector<acc_t> s(E);
    for (int64_t t = b; t < end; ++t) {
      scores_of<T, acc_t>(logits + t * E, E, scoring, s.data());
      int64_t* id = ids + t * k;
      select_top_k<acc_t>(s.data(), E, k, id);
      acc_t* wt = w + t * k;
      acc_t tot = 0;
      for (int64_t j = 0; j < k; ++j) tot += (wt[j] = s[id[j]]);
      if (renorm) {
        for (int64_t j = 0; j < k; ++j) wt[j] /= tot;
      }
    }
  });
}

// Routing weights are float32 (as transformers' routers give them), float64 for float64 logits.
at::ScalarType route_weight_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits_, int64_t top_k, bool renormalize,
                                                 c10::string_view scoring) {
  check_route(logits_, top_k);
  const Scoring sc = parse_scoring(std::string(scoring));
  const at::Tensor logits = logits_.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor w = at::empty({T, top_k}, logits.options().dtype(route_weight_type(logits)));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_route_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    route_impl<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), T, E, top_k, renormalize, sc,
                                w.mutable_data_ptr<acc_t>(), ids.mutable_data_ptr<int64_t>());
  });
  return {w, ids};
}

template <typename acc_t>
void route_backward_impl(const acc_t* gp, const acc_t* lp, const int64_t* ip, int64_t T, int64_t E, int64_t k,
                         bool renormalize, Scoring sc, acc_t* out) {
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t end) {
    std::vector<acc_t> p(E);
    for (int64_t t = b; t < end; ++t) {
      const acc_t* g = gp + t * k;
      const int64_t* id = ip + t * k;
      acc_t* d = out + t * E;
      if (sc == Scoring::Softmax) {
        scores_of<acc_t, acc_t>(lp + t * E, E, sc, p.data());
        if (renormalize) {  // w_j = softmax over the kept logits
          acc_t kept = 0, dot = 0;
          for (int64_t j = 0; j < k; ++j) kept += p[id[j]];
          for (int64_t j = 0; j < k; ++j) dot += (p[id[j]] / kept) * g[j];
          for (int64_t j = 0; j < k; ++j) d[id[j]] += (p[id[j]] / kept) * (g[j] - dot);
        } else {  // w_j = p_j of the full softmax
          acc_t dot = 0;
          for (int64_t j = 0; j < k; ++j) dot += p[id[j]] * g[j];
          for (int64_t e = 0; e < E; ++e) d[e] = -p[e] * dot;
          for (int64_t j = 0; j < k; ++j) d[id[j]] += p[id[j]] * g[j];
        }
      } else {
        for (int64_t j = 0; j < k; ++j) p[j] = acc_t(1) / (acc_t(1) + std::exp(-lp[t * E + id[j]]));
        if (renormalize) {  // w_j = p_j / sum_kept p
          acc_t kept = 0, dot = 0;
          for (int64_t j = 0; j < k; ++j) kept += p[j];
          for (int64_t j = 0; j < k; ++j) dot += (p[j] / kept) * g[j];
          for (int64_t j = 0; j < k; ++j) d[id[j]] += (g[j] - dot) / kept * p[j] * (acc_t(1) - p[j]);
        } else {
          for (int64_t j = 0; j < k; ++j) d[id[j]] += g[j] * p[j] * (acc_t(1) - p[j]);
        }
      }
    }
  });
}

at::Tensor moe_route_backward_cpu(const at::Tensor& grad_w, const at::Tensor& logits, const at::Tensor& w,
                                  const at::Tensor& ids_, bool renormalize, c10::string_view scoring) {
  const Scoring sc = check_route_backward(grad_w, logits, w, ids_, scoring);
  const int64_t T = logits.size(0), E = logits.size(1), k = ids_.size(1);
  const at::Tensor ids = ids_.to(at::kLong).contiguous();
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < E, kRouteOp, ": topk_ids must be in [0, E) = [0, ", E, "), found ",
                      lo < 0 ? lo : hi);
  }
  const at::ScalarType acc = route_weight_type(logits);
  const at::Tensor gw = grad_w.to(acc).contiguous(), lg = logits.to(acc).contiguous();
  at::Tensor grad = at::zeros({T, E}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "moe_route_backward_cpu", [&] {
    route_backward_impl<scalar_t>(gw.const_data_ptr<scalar_t>(), lg.const_data_ptr<scalar_t>(),
                                  ids.const_data_ptr<int64_t>(), T, E, k, renormalize, sc,
                                  grad.mutable_data_ptr<scalar_t>());
  });
  return grad.to(logits.scalar_type());
}

}  // namespace
}  // namespace accel::fused_moe::moe_cpu

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("moe_route", &accel::fused_moe::moe_cpu::moe_route_cpu);
  m.impl("moe_route_backward", &accel::fused_moe::moe_cpu::moe_route_backward_cpu);
}
