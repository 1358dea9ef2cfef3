// CUDA backend of the fused MoE ops: what the host code (fused_moe_cuda.cu) and the grouped-GEMM
// files (fused_moe_gemm_*_cuda.cu) share.
//
// Pairs p = t * k + j are counting-sorted by expert into a buffer of `n_blocks * kBlockM` rows in
// which every expert's segment starts at a multiple of kBlockM (padding rows hold -1), as vLLM's
// moe_align_block_size does; its size depends on the shapes only (T k + E (kBlockM - 1) rows,
// rounded up), so the ops are CUDA-graph capturable. One launch of a grouped GEMM then covers
// every expert: CTA row-block b works on expert block_expert[b] (-1: an unused block, which exits).
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/activation.h"

namespace accel::fused_moe::cuda {

// Rows of the sorted pair buffer per CTA of the pair-row GEMMs; the expert segments are padded
// to a multiple of it.
constexpr int kBlockM = 64;
// Columns per CTA tile of every grouped GEMM.
constexpr int kBlockN = 64;

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The five grouped GEMMs. "Rows" are the sorted pair rows (M = n_blocks * kBlockM, one expert per
// CTA row-block) except in WGrad, whose K runs over one expert's rows.
//   UpFwd   rows x I  = x[tok] . W1[e]^T (gate and up tiles together); epilogue act(g) u -> hbuf, g|u -> cache
//   DownFwd rows x H  = hbuf . W2[e]^T; epilogue w * acc -> per-pair rows y (float)
//   ZBwd    rows x I  = dout[tok] . W2[e]; epilogue dg|du -> dgu, z . h partial sums -> dw_part
//   DxBwd   rows x H  = dgu . W1[e]; epilogue -> per-pair rows (float)
//   WGrad   M x N per expert = sum over the expert's rows of A[row]^T B[row] (dW2 and dW1)
enum class GemmMode : int { UpFwd = 0, DownFwd = 1, ZBwd = 2, DxBwd = 3, WGrad = 4 };

// How the index of a memory line (a run of contiguous elements) maps to an address.
enum class Gather : int {
  Direct = 0,  // base + expert * expert_stride + line * ld
  Token = 1,   // line is a sorted row: base + token(row) * ld; padding rows read as zeros
  Row = 2,     // line is a sorted row: base + row * ld; padding rows read as zeros
};

struct Operand {
  const void* ptr = nullptr;
  int64_t ld = 0;
  int64_t expert_stride = 0;
  Gather gather = Gather::Direct;
  bool vec = false;  // 16-byte loads allowed (aligned base, ld and expert stride)
};

struct GemmParams {
  int M = 0, N = 0, K = 0;
  int top_k = 1;
  int inter = 0;  // I: the row offset of the up projection in W1, and the width of cache / dgu halves
  int n_blocks = 0, experts = 0;
  Operand a, b;
  const int* sorted_pairs = nullptr;    // (n_blocks * kBlockM) pair of each sorted row, -1: padding
  const int* block_expert = nullptr;    // (n_blocks) expert of each row block, -1: unused
  const int* expert_offsets = nullptr;  // (E + 1) first sorted row of each expert's segment
  void* out = nullptr;
  void* out2 = nullptr;         // UpFwd: the cache (nullptr: not saved)
  const void* cache = nullptr;  // ZBwd
  const void* weights = nullptr;
  bool weights_float = true;    // topk_weights is float32 (else the hidden dtype)
  float* dw_part = nullptr;     // ZBwd: (rows, ceil(I / kBlockN)) partial sums of z . h
  Activation act = Activation::None;
};

// dtype: at::kHalf, at::kBFloat16 or at::kFloat. Forward modes in one file, backward in others,
// so that they build in parallel.
void launch_gemm_fwd(at::ScalarType dtype, GemmMode mode, const GemmParams& p, cudaStream_t stream);
void launch_gemm_bwd(at::ScalarType dtype, GemmMode mode, const GemmParams& p, cudaStream_t stream);
void launch_gemm_wgrad(at::ScalarType dtype, const GemmParams& p, cudaStream_t stream);

// ------------------------------------------------------------------ element conversions

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Routing weight of pair p: float32 or the hidden dtype T.
template <typename T>
__device__ __forceinline__ float pair_weight(const void* w, bool is_float, int64_t p) {
  return is_float ? static_cast<const float*>(w)[p] : to_float(static_cast<const T*>(w)[p]);
}

}  // namespace accel::fused_moe::cuda
