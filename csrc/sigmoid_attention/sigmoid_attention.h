// Sigmoid attention: shared declarations for the schema file and the backends.
//
//   O[b, h, i, :] = sum_j sigmoid(scale * q_i . k_j + bias(b, h) + alibi(b, h, i, j)) * v_j
//
// over the keys j that the mask allows. There is no row max, no row sum and no normaliser, so a
// fully masked row gives 0 and the backward needs no saved statistics:
//   P = sigmoid(S), dP = dO V^T, dS = dP * P * (1 - P), dV = P^T dO, dQ = scale dS K, dK = scale dS^T Q.
//
// One problem description covers the three entry points:
//   dense   q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), any strides with a contiguous last dim;
//   varlen  q (Tq, Hq, D), k/v (Tk, Hkv, D) packed, sequence b at rows [cu[b], cu[b+1]);
//   kvcache dense with seqused_k: only the first seqused_k[b] keys of batch b are valid.
//
// Per batch b: len_q, len_k as above; query row i sits at key position i' = i + len_k - len_q
// (bottom-right alignment, as flash-attention). Key j is allowed when 0 <= j < len_k and
//   (window_left  < 0 or j >= i' - window_left) and (window_right < 0 or j <= i' + window_right);
// causal is window_right = 0. ALiBi adds -slope(b, h) * |i' - j| to the logit. The bias is
// bias[h] (per-head tensor), else bias_value, else -log(len_k) of the batch (the paper's default).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace accel::sigmoid_attention {

constexpr const char* kOp = "sigmoid_attention";

struct Problem {
  int64_t batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t max_len_q = 0, max_len_k = 0;  // dense: Lq, Lk; varlen: the given maxima
  bool varlen = false;
  // Element strides (the last dim is contiguous). Varlen: batch strides are 0 and the row of
  // token t of sequence b is (cu[b] + t) * row_stride.
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  // Device (or host, for CPU tensors) pointers, null when absent.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqused_k = nullptr;
  double scale = 1.0;  // kernels in fp32 narrow it; the fp64 CPU kernel keeps it
  const float* bias = nullptr;  // (Hq,) fp32
  bool has_bias_value = false;
  double bias_value = 0.0;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded; causal sets window_right = 0
  const float* alibi_slopes = nullptr;          // fp32, slope(b, h) = alibi_slopes[b * alibi_batch_stride + h]
  int64_t alibi_batch_stride = 0;
};

// Validates the arguments of the forward op (shapes, dtypes, devices, and for CPU index tensors
// their values) and describes the problem. Converted side inputs (fp32 bias/slopes) are returned
// in `keep` so that the pointers stay valid while the kernel runs.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
                     const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                     double scale, const c10::optional<at::Tensor>& bias, c10::optional<double> bias_value,
                     bool causal, int64_t window_left, int64_t window_right,
                     const c10::optional<at::Tensor>& alibi_slopes, std::vector<at::Tensor>& keep);

// The values of a host (CPU) cu_seqlens tensor: starts at 0, non-decreasing, ends within the
// packed length `total`, and no sequence is longer than `max_len`. make_problem runs it for CPU
// tensors; the CUDA forward on a host copy (the kernels trust these values).
void check_cu_seqlens_values(const char* name, const at::Tensor& cu, int64_t total, int64_t max_len);

// Checks grad_out against the forward output's shape (same as q), dtype and device.
void check_grad_out(const at::Tensor& grad_out, const at::Tensor& q);

// accel::kv_cache_append writes k_new/v_new (B, H_kv, L_new, D) into rows
// [cache_seqlens[b], cache_seqlens[b] + L_new) of k_cache/v_cache (B, H_kv, L_max, D), in place.
// A batch entry whose rows do not fit is an error on the CPU; on CUDA the lengths stay on the
// device (no host sync, CUDA-graph safe) and such an entry is skipped, never written out of bounds.
constexpr const char* kAppendOp = "kv_cache_append";

struct AppendGeometry {
  int64_t batch = 0, heads = 0, new_len = 0, max_len = 0, head_dim = 0;
};

// Validates shapes, dtypes and devices (and, for a CPU cache_seqlens, that every row fits).
AppendGeometry check_kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                                     const at::Tensor& v_new, const at::Tensor& cache_seqlens);

}  // namespace accel::sigmoid_attention
