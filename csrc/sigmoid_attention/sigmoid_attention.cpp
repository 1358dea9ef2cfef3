// Schema and argument checks for accel::sigmoid_attention_fwd / _bwd. Kernels live in cpu/ and
// cuda/ and register themselves, so a CPU-only build has the same schema.
#include "sigmoid_attention/sigmoid_attention.h"

#include <torch/library.h>

#include <utility>
#include <vector>

#include "common/checks.h"

namespace accel::sigmoid_attention {

namespace {

void check_last_dim_contiguous(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, kOp, ": ", name,
                    " must be contiguous in its last (head) dimension, got strides ", t.strides());
}

}  // namespace

void check_cu_seqlens_values(const char* name, const at::Tensor& cu, int64_t total, int64_t max_len) {
  const int32_t* p = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK_VALUE(p[0] == 0, kOp, ": ", name, "[0] must be 0, got ", p[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], kOp, ": ", name, " must be non-decreasing, but ", name, "[", i, "] = ", p[i],
                      " < ", name, "[", i - 1, "] = ", p[i - 1]);
    TORCH_CHECK_VALUE(p[i] - p[i - 1] <= max_len, kOp, ": sequence ", i - 1, " has length ", p[i] - p[i - 1], " (from ",
                      name, ") but the given maximum is ", max_len);
  }
  TORCH_CHECK_VALUE(p[n - 1] <= total, kOp, ": ", name, "[-1] = ", p[n - 1], " is beyond the ", total,
                    " packed rows of the tensor");
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
                     const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                     double scale, const c10::optional<at::Tensor>& bias, c10::optional<double> bias_value,
                     bool causal, int64_t window_left, int64_t window_right,
                     const c10::optional<at::Tensor>& alibi_slopes, std::vector<at::Tensor>& keep) {
  const bool has_cu_q = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
  const bool has_cu_k = cu_seqlens_k.has_value() && cu_seqlens_k->defined();
  TORCH_CHECK_VALUE(has_cu_q == has_cu_k, kOp,
                    ": cu_seqlens_q and cu_seqlens_k must be given together (varlen) or not at all");
  check_floating(kOp, "q", q);
  check_same_dtype(kOp, "k", k, q, "q");
  check_same_dtype(kOp, "v", v, q, "q");
  check_same_device(kOp, "k", k, q, "q");
  check_same_device(kOp, "v", v, q, "q");

  Problem p;
  p.varlen = has_cu_q;
  if (!p.varlen) {
    check_dim(kOp, "q", q, 4, "(B, H_q, L_q, D)");
    check_dim(kOp, "k", k, 4, "(B, H_kv, L_k, D)");
    check_dim(kOp, "v", v, 4, "(B, H_kv, L_k, D)");
    p.batch = q.size(0);
    p.heads_q = q.size(1);
    p.max_len_q = q.size(2);
    p.head_dim = q.size(3);
    p.heads_kv = k.size(1);
    p.max_len_k = k.size(2);
    TORCH_CHECK_VALUE(k.size(0) == p.batch && v.size(0) == p.batch, kOp,
                      ": q, k and v must have the same batch size, got q ", shape_str(q), ", k ", shape_str(k), ", v ",
                      shape_str(v));
    TORCH_CHECK_VALUE(v.size(1) == p.heads_kv && v.size(2) == p.max_len_k, kOp,
                      ": k and v must agree in heads and length, got k ", shape_str(k), ", v ", shape_str(v));
  } else {
    check_dim(kOp, "q", q, 3, "(total_q, H_q, D) in varlen mode");
    check_dim(kOp, "k", k, 3, "(total_k, H_kv, D) in varlen mode");
    check_dim(kOp, "v", v, 3, "(total_k, H_kv, D) in varlen mode");
    p.heads_q = q.size(1);
    p.head_dim = q.size(2);
    p.heads_kv = k.size(1);
    TORCH_CHECK_VALUE(v.size(0) == k.size(0) && v.size(1) == p.heads_kv, kOp,
                      ": k and v must agree in rows and heads, got k ", shape_str(k), ", v ", shape_str(v));
    for (auto [name, cu] : {std::pair<const char*, const at::Tensor*>{"cu_seqlens_q", &*cu_seqlens_q},
                            std::pair<const char*, const at::Tensor*>{"cu_seqlens_k", &*cu_seqlens_k}}) {
      check_dtype(kOp, name, *cu, at::kInt, "int32");
      TORCH_CHECK_VALUE(cu->dim() == 1 && cu->size(0) >= 2, kOp, ": ", name,
                        " must be 1-D (B + 1,) with B >= 1, got shape ", shape_str(*cu));
      TORCH_CHECK_VALUE(cu->is_contiguous(), kOp, ": ", name, " must be contiguous");
      check_same_device(kOp, name, *cu, q, "q");
    }
    TORCH_CHECK_VALUE(cu_seqlens_q->size(0) == cu_seqlens_k->size(0), kOp,
                      ": cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got ", cu_seqlens_q->size(0),
                      " and ", cu_seqlens_k->size(0));
    p.batch = cu_seqlens_q->size(0) - 1;
    TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, kOp, ": max_seqlen_q and max_seqlen_k must be >= 0, got ",
                      max_seqlen_q, " and ", max_seqlen_k);
    p.max_len_q = max_seqlen_q;
    p.max_len_k = max_seqlen_k;
    if (q.is_cpu()) {
      check_cu_seqlens_values("cu_seqlens_q", *cu_seqlens_q, q.size(0), max_seqlen_q);
      check_cu_seqlens_values("cu_seqlens_k", *cu_seqlens_k, k.size(0), max_seqlen_k);
    }
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
  }
  TORCH_CHECK_VALUE(p.head_dim >= 1, kOp, ": head dim must be >= 1, got q ", shape_str(q));
  TORCH_CHECK_VALUE(k.size(-1) == p.head_dim && v.size(-1) == p.head_dim, kOp,
                    ": q, k and v must have the same head dim, got q ", shape_str(q), ", k ", shape_str(k), ", v ",
                    shape_str(v));
  TORCH_CHECK_VALUE(p.heads_kv >= 1 && p.heads_q >= 1 && p.heads_q % p.heads_kv == 0, kOp,
                    ": the number of query heads (", p.heads_q,
                    ") must be a multiple of the number of key/value heads (", p.heads_kv, ")");
  check_last_dim_contiguous("q", q);
  check_last_dim_contiguous("k", k);
  check_last_dim_contiguous("v", v);
  if (!p.varlen) {
    p.q_batch_stride = q.stride(0); p.q_head_stride = q.stride(1); p.q_row_stride = q.stride(2);
    p.k_batch_stride = k.stride(0); p.k_head_stride = k.stride(1); p.k_row_stride = k.stride(2);
    p.v_batch_stride = v.stride(0); p.v_head_stride = v.stride(1); p.v_row_stride = v.stride(2);
  } else {
    p.q_head_stride = q.stride(1); p.q_row_stride = q.stride(0);
    p.k_head_stride = k.stride(1); p.k_row_stride = k.stride(0);
    p.v_head_stride = v.stride(1); p.v_row_stride = v.stride(0);
  }

  if (seqused_k.has_value() && seqused_k->defined()) {
    const at::Tensor& s = *seqused_k;
    check_dtype(kOp, "seqused_k (cache_seqlens)", s, at::kInt, "int32");
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == p.batch, kOp, ": seqused_k (cache_seqlens) must have shape (",
                      p.batch, ",), got ", shape_str(s));
    TORCH_CHECK_VALUE(s.is_contiguous(), kOp, ": seqused_k must be contiguous");
    check_same_device(kOp, "seqused_k", s, q, "q");
    if (s.is_cpu()) {
      const int32_t* u = s.data_ptr<int32_t>();
      for (int64_t b = 0; b < p.batch; ++b) {
        int64_t cap = p.max_len_k;
        if (p.varlen) cap = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
        TORCH_CHECK_VALUE(u[b] >= 0 && u[b] <= cap, kOp, ": seqused_k[", b, "] = ", u[b], " is outside [0, ", cap,
                          "], the keys available for that batch entry");
      }
    }
    p.seqused_k = s.data_ptr<int32_t>();
  }

  TORCH_CHECK_VALUE(scale == scale, kOp, ": scale must not be NaN");
  p.scale = scale;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(!bias_value.has_value(), kOp,
                      ": give the bias either as a per-head tensor or as a float, not both");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.heads_q, kOp, ": a tensor bias must have shape (H_q,) = (",
                      p.heads_q, ",), got ", shape_str(*bias));
    check_floating(kOp, "bias", *bias);
    check_same_device(kOp, "bias", *bias, q, "q");
    at::Tensor b32 = bias->to(at::kFloat).contiguous();
    keep.push_back(b32);
    p.bias = b32.data_ptr<float>();
  } else if (bias_value.has_value()) {
    p.has_bias_value = true;
    p.bias_value = *bias_value;
  }

  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, kOp,
                    ": window sizes must be >= 0, or -1 for unbounded, got (", window_left, ", ", window_right, ")");
  p.window_left = window_left;
  p.window_right = causal ? 0 : window_right;
  TORCH_CHECK_VALUE(!causal || window_right <= 0, kOp, ": causal=True cannot be combined with a right window of ",
                    window_right, " (causal means a right window of 0)");

  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& a = *alibi_slopes;
    check_floating(kOp, "alibi_slopes", a);
    check_same_device(kOp, "alibi_slopes", a, q, "q");
    TORCH_CHECK_VALUE((a.dim() == 1 && a.size(0) == p.heads_q) ||
                          (a.dim() == 2 && a.size(0) == p.batch && a.size(1) == p.heads_q),
                      kOp, ": alibi_slopes must have shape (H_q,) = (", p.heads_q, ",) or (B, H_q) = (", p.batch, ", ",
                      p.heads_q, "), got ", shape_str(a));
    at::Tensor a32 = a.to(at::kFloat).contiguous();
    keep.push_back(a32);
    p.alibi_slopes = a32.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? p.heads_q : 0;
  }
  return p;
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& q) {
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), kOp, ": grad_out must have the output's shape ", shape_str(q),
                    ", got ", shape_str(grad_out));
  check_same_dtype(kOp, "grad_out", grad_out, q, "q");
  check_same_device(kOp, "grad_out", grad_out, q, "q");
  check_last_dim_contiguous("grad_out", grad_out);
}

AppendGeometry check_kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                                     const at::Tensor& v_new, const at::Tensor& cache_seqlens) {
  check_dim(kAppendOp, "k_cache", k_cache, 4, "(B, H_kv, L_max, D)");
  check_dim(kAppendOp, "k_new", k_new, 4, "(B, H_kv, L_new, D)");
  check_floating(kAppendOp, "k_cache", k_cache);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"v_cache", v_cache},
                                {"k_new", k_new}, {"v_new", v_new}}) {
    check_same_dtype(kAppendOp, name, t, k_cache, "k_cache");
    check_same_device(kAppendOp, name, t, k_cache, "k_cache");
  }
  const AppendGeometry g{k_cache.size(0), k_cache.size(1), k_new.size(2), k_cache.size(2), k_cache.size(3)};
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), kAppendOp, ": v_cache must have k_cache's shape ",
                    shape_str(k_cache), ", got ", shape_str(v_cache));
  TORCH_CHECK_VALUE(k_new.size(0) == g.batch && k_new.size(1) == g.heads && k_new.size(3) == g.head_dim, kAppendOp,
                    ": k_new must have shape (B, H_kv, L_new, D) = (", g.batch, ", ", g.heads, ", L_new, ", g.head_dim,
                    ") to match the cache ", shape_str(k_cache), ", got ", shape_str(k_new));
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), kAppendOp, ": v_new must have k_new's shape ", shape_str(k_new),
                    ", got ", shape_str(v_new));
  TORCH_CHECK_VALUE(g.new_len <= g.max_len, kAppendOp, ": cannot append ", g.new_len,
                    " tokens (k_new.size(2)) to a cache of length ", g.max_len);
  check_dtype(kAppendOp, "cache_seqlens", cache_seqlens, at::kInt, "int32");
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == g.batch, kAppendOp,
                    ": cache_seqlens must have shape (B,) = (", g.batch, ",), got ", shape_str(cache_seqlens));
  TORCH_CHECK_VALUE(cache_seqlens.is_contiguous(), kAppendOp, ": cache_seqlens must be contiguous, got strides ",
                    cache_seqlens.strides());
  check_same_device(kAppendOp, "cache_seqlens", cache_seqlens, k_cache, "k_cache");
  if (cache_seqlens.is_cpu()) {
    const int32_t* s = cache_seqlens.data_ptr<int32_t>();
    for (int64_t b = 0; b < g.batch; ++b) {
      TORCH_CHECK_VALUE(s[b] >= 0 && s[b] + g.new_len <= g.max_len, kAppendOp,
                        ": the cache is too small: cache_seqlens[", b, "] = ", s[b], " plus ", g.new_len,
                        " new tokens must lie in [0, ", g.max_len, "], the cache's length");
    }
  }
  return g;
}

}  // namespace accel::sigmoid_attention

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def(
      "sigmoid_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float scale, Tensor? bias, float? bias_value, "
      "bool causal, int window_left, int window_right, Tensor? alibi_slopes) -> Tensor");
  m.def(
      "sigmoid_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float scale, Tensor? bias, "
      "float? bias_value, bool causal, int window_left, int window_right, Tensor? alibi_slopes) "
      "-> (Tensor, Tensor, Tensor)");
  // The schema declares the in-place writes, so torch.compile functionalises the op correctly.
  m.def(
      "kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens) "
      "-> ()");
}
