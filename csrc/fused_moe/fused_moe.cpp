// Schema and argument checks for the fused MoE ops. Kernels live in cpu/ and cuda/ and register
// themselves, so a CPU-only build has the same schema.
#include "fused_moe/fused_moe.h"

#include <torch/library.h>

#include <utility>

#include "common/checks.h"

namespace accel::fused_moe {

Scoring parse_scoring(const std::string& name) {
  if (name == "softmax") return Scoring::Softmax;
  if (name == "sigmoid") return Scoring::Sigmoid;
  TORCH_CHECK_VALUE(false, kRouteOp, ": scoring must be 'softmax' or 'sigmoid', got '", name, "'");
}

Geometry check_forward(const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                       const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  check_dim(kOp, "hidden", hidden, 2, "(T, H)");
  check_dim(kOp, "gate_up_proj", gate_up_proj, 3, "(E, 2I, H)");
  check_dim(kOp, "down_proj", down_proj, 3, "(E, H, I)");
  check_dim(kOp, "topk_weights", topk_weights, 2, "(T, k)");
  check_dim(kOp, "topk_ids", topk_ids, 2, "(T, k)");
  check_floating(kOp, "hidden", hidden);
  check_same_dtype(kOp, "gate_up_proj", gate_up_proj, hidden, "hidden");
  check_same_dtype(kOp, "down_proj", down_proj, hidden, "hidden");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"gate_up_proj", gate_up_proj},
                                {"down_proj", down_proj}, {"topk_weights", topk_weights}, {"topk_ids", topk_ids}}) {
    check_same_device(kOp, name, t, hidden, "hidden");
  }
  TORCH_CHECK_TYPE(topk_weights.scalar_type() == at::kFloat || topk_weights.scalar_type() == hidden.scalar_type(), kOp,
                   ": topk_weights must be float32 or the hidden dtype (", hidden.scalar_type(), "), got ",
                   topk_weights.scalar_type());
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt, kOp,
                   ": topk_ids must be int64 or int32, got ", topk_ids.scalar_type());
  Geometry g;
  g.tokens = hidden.size(0);
  g.hidden = hidden.size(1);
  g.experts = gate_up_proj.size(0);
  g.inter = down_proj.size(2);
  g.top_k = topk_ids.size(1);
  TORCH_CHECK_VALUE(g.experts >= 1, kOp, ": gate_up_proj must hold at least one expert, got shape ",
                    shape_str(gate_up_proj));
  TORCH_CHECK_VALUE(gate_up_proj.size(1) == 2 * g.inter && gate_up_proj.size(2) == g.hidden, kOp,
                    ": gate_up_proj must have shape (E, 2I, H) = (", g.experts, ", ", 2 * g.inter, ", ", g.hidden,
                    ") for hidden ", shape_str(hidden), " and down_proj ", shape_str(down_proj), ", got ",
                    shape_str(gate_up_proj));
  TORCH_CHECK_VALUE(down_proj.size(0) == g.experts && down_proj.size(1) == g.hidden, kOp,
                    ": down_proj must have shape (E, H, I) = (", g.experts, ", ", g.hidden, ", I), got ",
                    shape_str(down_proj));
  TORCH_CHECK_VALUE(topk_ids.size(0) == g.tokens, kOp, ": topk_ids must have shape (T, k) with T = ", g.tokens,
                    " (hidden's rows), got ", shape_str(topk_ids));
  TORCH_CHECK_VALUE(topk_weights.sizes() == topk_ids.sizes(), kOp, ": topk_weights ", shape_str(topk_weights),
                    " and topk_ids ", shape_str(topk_ids), " must have the same shape (T, k)");
  TORCH_CHECK_VALUE(g.top_k >= 1 && g.top_k <= g.experts, kOp, ": top-k must be in [1, E] = [1, ", g.experts,
                    "], got k = ", g.top_k);
  return g;
}

Geometry check_backward(const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                        const at::Tensor& down_proj, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                        const at::Tensor& cache) {
  const Geometry g = check_forward(hidden, gate_up_proj, down_proj, topk_weights, topk_ids);
  TORCH_CHECK_VALUE(grad_out.sizes() == hidden.sizes(), kOp, ": grad_out must have hidden's shape ", shape_str(hidden),
                    ", got ", shape_str(grad_out));
  check_same_dtype(kOp, "grad_out", grad_out, hidden, "hidden");
  check_same_device(kOp, "grad_out", grad_out, hidden, "hidden");
  TORCH_CHECK_VALUE(cache.dim() == 2 && cache.size(0) == g.tokens * g.top_k && cache.size(1) == 2 * g.inter, kOp,
                    ": cache must be the forward's (T k, 2I) = (", g.tokens * g.top_k, ", ", 2 * g.inter,
                    ") gate/up pre-activations (run the forward with save_cache=True), got ", shape_str(cache));
  check_same_dtype(kOp, "cache", cache, hidden, "hidden");
  check_same_device(kOp, "cache", cache, hidden, "hidden");
  return g;
}

void check_route(const at::Tensor& router_logits, int64_t top_k) {
  check_dim(kRouteOp, "router_logits", router_logits, 2, "(T, E)");
  check_floating(kRouteOp, "router_logits", router_logits);
  const int64_t experts = router_logits.size(1);
  TORCH_CHECK_VALUE(experts >= 1, kRouteOp, ": router_logits must have at least one expert column, got shape ",
                    shape_str(router_logits));
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= experts, kRouteOp, ": top_k must be in [1, E] = [1, ", experts, "], got ",
                    top_k);
}

Scoring check_route_backward(const at::Tensor& grad_weights, const at::Tensor& router_logits,
                             const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view scoring) {
  check_dim(kRouteOp, "topk_ids", topk_ids, 2, "(T, k)");
  check_route(router_logits, topk_ids.size(1));
  const int64_t tokens = router_logits.size(0);
  TORCH_CHECK_VALUE(topk_ids.size(0) == tokens, kRouteOp, ": topk_ids must have shape (T, k) with T = ", tokens,
                    ", got ", shape_str(topk_ids));
  TORCH_CHECK_VALUE(grad_weights.sizes() == topk_ids.sizes() && topk_weights.sizes() == topk_ids.sizes(), kRouteOp,
                    ": grad_weights ", shape_str(grad_weights), ", topk_weights ", shape_str(topk_weights),
                    " and topk_ids ", shape_str(topk_ids), " must all have shape (T, k)");
  check_floating(kRouteOp, "grad_weights", grad_weights);
  check_floating(kRouteOp, "topk_weights", topk_weights);
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt, kRouteOp,
                   ": topk_ids must be int64 or int32, got ", topk_ids.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_weights", grad_weights},
                                {"topk_weights", topk_weights}, {"topk_ids", topk_ids}}) {
    check_same_device(kRouteOp, name, t, router_logits, "router_logits");
  }
  return parse_scoring(std::string(scoring));
}

}  // namespace accel::fused_moe

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def("moe_route(Tensor router_logits, int top_k, bool renormalize, str scoring) -> (Tensor, Tensor)");
  m.def(
      "moe_route_backward(Tensor grad_weights, Tensor router_logits, Tensor topk_weights, Tensor topk_ids, "
      "bool renormalize, str scoring) -> Tensor");
  m.def(
      "fused_moe_fwd(Tensor hidden, Tensor gate_up_proj, Tensor down_proj, Tensor topk_weights, Tensor topk_ids, "
      "str activation, bool save_cache) -> (Tensor, Tensor)");
  m.def(
      "fused_moe_bwd(Tensor grad_out, Tensor hidden, Tensor gate_up_proj, Tensor down_proj, Tensor topk_weights, "
      "Tensor topk_ids, Tensor cache, str activation, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}
