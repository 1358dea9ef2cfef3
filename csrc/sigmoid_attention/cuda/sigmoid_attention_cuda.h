// Internal to the CUDA backend of sigmoid attention: the kernel parameters and the launchers.
//
// The kernel translation units include only this header and the CUDA headers (no ATen), so they
// compile quickly; sigmoid_attention_cuda.cu turns the op's tensors into Params, picks the
// launcher and checks the returned CUDA error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace accel::sigmoid_attention::cuda {

// Head dims are served by the next multiple of 32 (zero padded), up to this.
constexpr int kMaxHeadDim = 256;
// Lengths and window sizes are kept below this so that every index difference fits in an int.
constexpr int64_t kMaxLength = int64_t(1) << 30;

inline int head_dim_bucket(int64_t d) { return static_cast<int>((d + 31) / 32 * 32); }

// Everything a kernel needs, by value. Element strides; varlen batch strides are 0 and the row of
// token t of sequence b is (cu[b] + t) * row_stride, for inputs and outputs alike.
struct Params {
  // forward inputs / backward inputs
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* dout = nullptr;  // backward only
  // forward output (contiguous, q's shape), or the fp32 split-KV accumulator when o_accum is set
  void* o = nullptr;
  float* o_accum = nullptr;
  // backward outputs: dq as fp32 (atomically accumulated), dk, dv in the input dtype
  float* dq_accum = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  int64_t do_batch_stride = 0, do_head_stride = 0, do_row_stride = 0;
  // o, o_accum and dq_accum share q's (contiguous) layout; dk and dv share k's contiguous layout
  int64_t o_batch_stride = 0, o_head_stride = 0, o_row_stride = 0;
  int64_t dk_batch_stride = 0, dk_head_stride = 0, dk_row_stride = 0;

  int batch = 0, heads_q = 0, heads_kv = 0, group = 1, head_dim = 0;
  int max_len_q = 0, max_len_k = 0;
  const int32_t* cu_seqlens_q = nullptr;  // varlen when set (cu_seqlens_k is then set too)
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqused_k = nullptr;

  float scale = 1.f;
  const float* bias = nullptr;  // (Hq,) fp32
  bool has_bias_value = false;
  float bias_value = 0.f;
  int window_left = -1, window_right = -1;  // -1: unbounded; clamped to kMaxLength by the host
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;

  // 16-byte cp.async / vector paths: every input pointer 16-byte aligned, every input stride and
  // the head dim multiples of 8 elements (vec_load); outputs with a head dim multiple of 8 (vec_store).
  bool vec_load = false;
  bool vec_store = false;
  // Split-KV forward: the key range of a query block is cut into num_splits parts, each CTA adds
  // its partial output into o_accum (fp32, zeroed). With no normaliser the parts simply add up.
  int num_splits = 1;
};

// Tile geometry of the tensor-core kernels, needed by the host for grids and split decisions.
struct TileShape {
  int block_m, block_n, threads;
  int64_t smem_bytes;
};
TileShape fwd_tile_shape(int head_dim_bucket);
TileShape bwd_tile_shape(int head_dim_bucket);

// Launchers: return the launch's error (cudaSuccess when fine); the caller checks it. head_dim
// must be <= kMaxHeadDim. Grids: forward (n_m_blocks * num_splits, Hq, B); backward
// (n_n_blocks, Hkv, B).
cudaError_t run_fwd_fp16(const Params& p, cudaStream_t stream);
cudaError_t run_fwd_bf16(const Params& p, cudaStream_t stream);
cudaError_t run_bwd_fp16(const Params& p, cudaStream_t stream);
cudaError_t run_bwd_bf16(const Params& p, cudaStream_t stream);
// fp32: plain FMA kernels (no tensor cores) for exactness checks and fp32 training.
int64_t fwd_fp32_smem_bytes(int head_dim);
int64_t bwd_fp32_smem_bytes(int head_dim);
cudaError_t run_fwd_fp32(const Params& p, cudaStream_t stream);
cudaError_t run_bwd_fp32(const Params& p, cudaStream_t stream);

}  // namespace accel::sigmoid_attention::cuda
