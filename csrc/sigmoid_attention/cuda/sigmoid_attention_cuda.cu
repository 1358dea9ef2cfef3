// CUDA backend of accel::sigmoid_attention_fwd / _bwd: argument checks (shared with the CPU
// backend through make_problem), output allocation, kernel choice and launch. The kernels are in
// sigmoid_attention_fwd.cuh / _bwd.cuh (fp16/bf16 tensor cores) and sigmoid_attention_fp32_cuda.cu.
//
// The launches are asynchronous on the current stream and the grids are sized by max_seqlen_q /
// max_seqlen_k; varlen lengths and seqused_k are read by the kernels. The one host read is the
// varlen forward's check of cu_seqlens, skipped while a CUDA graph is captured.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "sigmoid_attention/cuda/sigmoid_attention_cuda.h"
#include "sigmoid_attention/sigmoid_attention.h"

namespace accel::sigmoid_attention::cuda {
namespace {

// Grid dims y and z (heads, batch) are limited to 65535 by CUDA.
constexpr int64_t kMaxGridYZ = 65535;

void check_supported(const at::Tensor& q, const Problem& pr) {
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, kOp,
              ": the CUDA kernels support float16 and bfloat16 (tensor cores) and float32 inputs, got ", dt,
              " (float64 runs on CPU only)");
  TORCH_CHECK(pr.head_dim <= kMaxHeadDim, kOp, ": the CUDA kernels support head dims up to ", kMaxHeadDim,
              ", got ", pr.head_dim);
  TORCH_CHECK(pr.max_len_q < kMaxLength && pr.max_len_k < kMaxLength, kOp,
              ": sequence lengths must be below 2^30 on CUDA, got max_seqlen_q = ", pr.max_len_q,
              ", max_seqlen_k = ", pr.max_len_k);
  TORCH_CHECK(pr.batch <= kMaxGridYZ && pr.heads_q <= kMaxGridYZ, kOp,
              ": the CUDA kernels support up to 65535 batch entries and heads, got batch ", pr.batch, ", heads ",
              pr.heads_q);
  if (dt != at::kFloat) {
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(props->major >= 8, kOp, ": float16/bfloat16 kernels need a GPU of compute capability 8.0 or newer (",
                "Ampere), this one is ", props->major, ".", props->minor, "; use float32");
  }
}

void check_smem(int64_t bytes, const char* what) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes <= static_cast<int64_t>(props->sharedMemPerBlockOptin), kOp, ": the ", what, " kernel needs ",
              bytes, " bytes of shared memory per block but this GPU offers ", props->sharedMemPerBlockOptin);
}

int clamp_window(int64_t w) { return w < 0 ? -1 : static_cast<int>(std::min<int64_t>(w, kMaxLength)); }

// 16-byte vector loads need the base pointer and every stride that multiplies a non-zero index
// to be multiples of 16 bytes (8 elements of 16 bits; for fp32 the vector path is not used).
bool vec_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// (batch, head, row) strides of a dense (B, H, L, D) or varlen (T, H, D) tensor.
void strides_of(const at::Tensor& t, bool varlen, int64_t& batch, int64_t& head, int64_t& row) {
  if (varlen) {
    batch = 0;
    head = t.stride(1);
    row = t.stride(0);
  } else {
    batch = t.stride(0);
    head = t.stride(1);
    row = t.stride(2);
  }
}

Params make_params(const Problem& pr) {
  Params p;
  p.q_batch_stride = pr.q_batch_stride;
  p.q_head_stride = pr.q_head_stride;
  p.q_row_stride = pr.q_row_stride;
  p.k_batch_stride = pr.k_batch_stride;
  p.k_head_stride = pr.k_head_stride;
  p.k_row_stride = pr.k_row_stride;
  p.v_batch_stride = pr.v_batch_stride;
  p.v_head_stride = pr.v_head_stride;
  p.v_row_stride = pr.v_row_stride;
  p.batch = static_cast<int>(pr.batch);
  p.heads_q = static_cast<int>(pr.heads_q);
  p.heads_kv = static_cast<int>(pr.heads_kv);
  p.group = static_cast<int>(pr.heads_q / pr.heads_kv);
  p.head_dim = static_cast<int>(pr.head_dim);
  p.max_len_q = static_cast<int>(pr.max_len_q);
  p.max_len_k = static_cast<int>(pr.max_len_k);
  p.cu_seqlens_q = pr.cu_seqlens_q;
  p.cu_seqlens_k = pr.cu_seqlens_k;
  p.seqused_k = pr.seqused_k;
  p.scale = pr.scale;
  p.bias = pr.bias;
  p.has_bias_value = pr.has_bias_value;
  p.bias_value = pr.bias_value;
  p.window_left = clamp_window(pr.window_left);
  p.window_right = clamp_window(pr.window_right);
  p.alibi_slopes = pr.alibi_slopes;
  p.alibi_batch_stride = pr.alibi_batch_stride;
  return p;
}

// Split-KV when the grid alone cannot fill the GPU (decoding: few query rows, long caches). The
// partial outputs of the key ranges add up (no normaliser), through fp32 atomics.
int choose_num_splits(const Params& p, const TileShape& ts) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t m_blocks = (p.max_len_q + ts.block_m - 1) / ts.block_m;
  const int64_t ctas = m_blocks * p.heads_q * p.batch;
  const int64_t n_blocks = (p.max_len_k + ts.block_n - 1) / ts.block_n;
  if (ctas >= sms || n_blocks < 8) return 1;
  // about two waves, at least 4 key tiles per split
  const int64_t splits = std::min<int64_t>({(2 * sms + ctas - 1) / ctas, n_blocks / 4, 64});
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

at::Tensor sigmoid_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const c10::optional<at::Tensor>& cu_seqlens_q,
                                      const c10::optional<at::Tensor>& cu_seqlens_k,
                                      const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
                                      int64_t max_seqlen_k, double scale, const c10::optional<at::Tensor>& bias,
                                      c10::optional<double> bias_value, bool causal, int64_t window_left,
                                      int64_t window_right, const c10::optional<at::Tensor>& alibi_slopes) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  std::vector<at::Tensor> keep;
  const Problem pr = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale,
                                  bias, bias_value, causal, window_left, window_right, alibi_slopes, keep);
  check_supported(q, pr);
  // The kernels trust cu_seqlens: check its values on a host copy, except while a CUDA graph is
  // captured (no copy to the host is allowed there).
  if (pr.varlen && c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q->cpu(), q.size(0), max_seqlen_q);
    check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k->cpu(), k.size(0), max_seqlen_k);
  }

  // Varlen rows outside every sequence are never visited by a CTA: start from zeros.
  at::Tensor out = pr.varlen ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
  if (out.numel() == 0 || pr.batch == 0 || pr.max_len_q == 0) return out;
  if (pr.max_len_k == 0) return out.zero_();

  Params p = make_params(pr);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  strides_of(out, pr.varlen, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  const bool fp32 = q.scalar_type() == at::kFloat;
  p.vec_load = !fp32 && pr.head_dim % 8 == 0 && vec_aligned(q) && vec_aligned(k) && vec_aligned(v);
  p.vec_store = !fp32 && pr.head_dim % 8 == 0;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (fp32) {
    check_smem(fwd_fp32_smem_bytes(p.head_dim), "float32 forward");
    C10_CUDA_CHECK(run_fwd_fp32(p, stream));
    return out;
  }
  const TileShape ts = fwd_tile_shape(head_dim_bucket(pr.head_dim));
  check_smem(ts.smem_bytes, "forward");
  at::Tensor o_accum;
  p.num_splits = choose_num_splits(p, ts);
  if (p.num_splits > 1) {
    o_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    p.o_accum = o_accum.data_ptr<float>();
  }
  C10_CUDA_CHECK(q.scalar_type() == at::kHalf ? run_fwd_fp16(p, stream) : run_fwd_bf16(p, stream));
  if (p.num_splits > 1) out.copy_(o_accum);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    const c10::optional<at::Tensor>& bias, c10::optional<double> bias_value, bool causal, int64_t window_left,
    int64_t window_right, const c10::optional<at::Tensor>& alibi_slopes) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  std::vector<at::Tensor> keep;
  const Problem pr = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale,
                                  bias, bias_value, causal, window_left, window_right, alibi_slopes, keep);
  check_grad_out(grad_out, q);
  check_supported(q, pr);
  const bool fp32 = q.scalar_type() == at::kFloat;

  // dQ is accumulated in fp32 with atomics (for fp32 inputs that buffer is dq itself). Key rows
  // that no CTA visits (past seqused_k, outside every varlen sequence) must read as zero.
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  const bool uncovered_keys = pr.varlen || pr.seqused_k != nullptr;
  at::Tensor dk = uncovered_keys ? at::zeros(k.sizes(), k.options()) : at::empty(k.sizes(), k.options());
  at::Tensor dv = uncovered_keys ? at::zeros(v.sizes(), v.options()) : at::empty(v.sizes(), v.options());
  auto result = [&] {
    return std::make_tuple(fp32 ? dq_accum : dq_accum.to(q.scalar_type()), dk, dv);
  };
  if (dk.numel() == 0) return result();
  if (q.numel() == 0 || pr.batch == 0 || pr.max_len_q == 0 || pr.max_len_k == 0) {
    dk.zero_();
    dv.zero_();
    return result();
  }

  Params p = make_params(pr);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = grad_out.data_ptr();
  strides_of(grad_out, pr.varlen, p.do_batch_stride, p.do_head_stride, p.do_row_stride);
  p.dq_accum = dq_accum.data_ptr<float>();
  strides_of(dq_accum, pr.varlen, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides_of(dk, pr.varlen, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride);
  p.vec_load = !fp32 && pr.head_dim % 8 == 0 && vec_aligned(q) && vec_aligned(k) && vec_aligned(v) &&
               vec_aligned(grad_out);
  p.vec_store = !fp32 && pr.head_dim % 8 == 0;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (fp32) {
    check_smem(bwd_fp32_smem_bytes(p.head_dim), "float32 backward");
    C10_CUDA_CHECK(run_bwd_fp32(p, stream));
  } else {
    check_smem(bwd_tile_shape(head_dim_bucket(pr.head_dim)).smem_bytes, "backward");
    C10_CUDA_CHECK(q.scalar_type() == at::kHalf ? run_bwd_fp16(p, stream) : run_bwd_bf16(p, stream));
  }
  return result();
}

}  // namespace
}  // namespace accel::sigmoid_attention::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) {
  m.impl("sigmoid_attention_fwd", &accel::sigmoid_attention::cuda::sigmoid_attention_fwd_cuda);
  m.impl("sigmoid_attention_bwd", &accel::sigmoid_attention::cuda::sigmoid_attention_bwd_cuda);
}
