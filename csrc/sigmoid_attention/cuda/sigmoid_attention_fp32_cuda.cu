// fp32 sigmoid attention on CUDA: plain FMA kernels (no tensor cores), forward and backward, with
// the masks, biases and layouts of the tensor-core kernels. They serve fp32 training and the
// tight-tolerance tests; one instantiation each (the head dim is a runtime value <= 256).
//
// Forward: one CTA (128 threads) per (16 query rows, head, batch), key tiles of 32. Thread t owns
// output columns t and t + 128 of the 16 rows (32 fp32 accumulators).
// Backward: one CTA per (16 keys, kv head, batch) looping over the GQA group's query heads and
// the query blocks of 16 that see the keys. Thread t owns columns t and t + 128 of dK and dV of
// the 16 keys; dQ is added with fp32 atomics into the (zeroed) fp32 dq output.
//
// fwd_tile_shape / bwd_tile_shape, at the end, report the tensor-core kernels' configurations.
#include "sigmoid_attention/cuda/sigmoid_attention_bwd.cuh"
#include "sigmoid_attention/cuda/sigmoid_attention_fwd.cuh"

namespace accel::sigmoid_attention::cuda {
namespace detail {
namespace {

constexpr int kThreads = 128;
constexpr int kFwdBlockM = 16, kFwdBlockN = 32;
constexpr int kBwdBlockM = 16, kBwdBlockN = 16;
constexpr int kBwdPitchP = kBwdBlockN + 1;
static_assert(kMaxHeadDim <= 2 * kThreads, "two output columns per thread");

// Odd pitch: a warp walking down a column of 32 rows hits 32 different banks.
__host__ __device__ inline int pitch_of(int d) { return d | 1; }

__global__ void __launch_bounds__(kThreads) sigmoid_attention_fwd_fp32_kernel(const Params p) {
  ACCEL_DYNAMIC_SMEM(float, smem_f);
  const int D = p.head_dim, pitch = pitch_of(D);
  float* sQ = smem_f;                    // [16][pitch]
  float* sK = sQ + kFwdBlockM * pitch;   // [32][pitch]
  float* sV = sK + kFwdBlockN * pitch;   // [32][pitch]
  float* sP = sV + kFwdBlockN * pitch;   // [16][32]

  const int m_block = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo s = seq_info(p, b);
  const int m0 = m_block * kFwdBlockM;
  if (m0 >= s.len_q) return;
  const int hk = h / p.group;
  const int offset = s.len_k - s.len_q;
  int n_lo, n_hi;
  key_range(p, s, offset, m0, min(m0 + kFwdBlockM, s.len_q) - 1, n_lo, n_hi);
  const int nb_lo = n_lo / kFwdBlockN;
  const int nb_hi = n_hi > n_lo ? ceil_div(n_hi, kFwdBlockN) : nb_lo;

  const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                   (s.q_row0 + m0) * p.q_row_stride;
  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                   s.k_row0 * p.k_row_stride;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                   s.k_row0 * p.v_row_stride;
  const int tid = threadIdx.x;
  const float scale = p.scale, bias = head_bias(p, h, s.len_k), slope = alibi_slope(p, b, h);
  const int c0 = tid, c1 = tid + kThreads;

  for (int idx = tid; idx < kFwdBlockM * D; idx += kThreads) {
    const int r = idx / D, c = idx - r * D;
    sQ[r * pitch + c] = r < s.len_q - m0 ? q[r * p.q_row_stride + c] : 0.f;
  }
  float acc[kFwdBlockM][2];
#pragma unroll
  for (int r = 0; r < kFwdBlockM; ++r) acc[r][0] = acc[r][1] = 0.f;

  for (int nb = nb_lo; nb < nb_hi; ++nb) {
    const int n0 = nb * kFwdBlockN;
    __syncthreads();  // the previous tile's readers are done (first pass: sQ is written)
    for (int idx = tid; idx < kFwdBlockN * D; idx += kThreads) {
      const int r = idx / D, c = idx - r * D;
      const bool ok = r < s.len_k - n0;
      sK[r * pitch + c] = ok ? k[(n0 + r) * p.k_row_stride + c] : 0.f;
      sV[r * pitch + c] = ok ? v[(n0 + r) * p.v_row_stride + c] : 0.f;
    }
    __syncthreads();
    const int j = tid % kFwdBlockN;
#pragma unroll
    for (int i = 0; i < kFwdBlockM / (kThreads / kFwdBlockN); ++i) {
      const int r = tid / kFwdBlockN + i * (kThreads / kFwdBlockN);
      float dot = 0.f;
      for (int c = 0; c < D; ++c) dot = fmaf(sQ[r * pitch + c], sK[j * pitch + c], dot);
      int dist;
      const bool ok = allowed(p, s, offset, m0 + r, n0 + j, dist);
      sP[r * kFwdBlockN + j] = ok ? sigmoid_fast(fmaf(dot, scale, bias) - slope * static_cast<float>(abs(dist))) : 0.f;
    }
    __syncthreads();
    for (int jj = 0; jj < kFwdBlockN; ++jj) {
      const float v0 = c0 < D ? sV[jj * pitch + c0] : 0.f;
      const float v1 = c1 < D ? sV[jj * pitch + c1] : 0.f;
#pragma unroll
      for (int r = 0; r < kFwdBlockM; ++r) {
        const float pr = sP[r * kFwdBlockN + jj];
        acc[r][0] = fmaf(pr, v0, acc[r][0]);
        acc[r][1] = fmaf(pr, v1, acc[r][1]);
      }
    }
  }

  float* o = static_cast<float*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + (s.q_row0 + m0) * p.o_row_stride;
#pragma unroll
  for (int r = 0; r < kFwdBlockM; ++r) {
    if (r < s.len_q - m0) {
      if (c0 < D) o[r * p.o_row_stride + c0] = acc[r][0];
      if (c1 < D) o[r * p.o_row_stride + c1] = acc[r][1];
    }
  }
}

__global__ void __launch_bounds__(kThreads) sigmoid_attention_bwd_fp32_kernel(const Params p) {
  ACCEL_DYNAMIC_SMEM(float, smem_f);
  const int D = p.head_dim, pitch = pitch_of(D);
  float* sK = smem_f;                    // [16 keys][pitch]
  float* sV = sK + kBwdBlockN * pitch;   // [16 keys][pitch]
  float* sQ = sV + kBwdBlockN * pitch;   // [16 queries][pitch]
  float* sdO = sQ + kBwdBlockM * pitch;  // [16 queries][pitch]
  float* sP = sdO + kBwdBlockM * pitch;  // [16 queries][17]
  float* sdS = sP + kBwdBlockM * kBwdPitchP;

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqInfo s = seq_info(p, b);
  const int n0 = n_block * kBwdBlockN;
  if (n0 >= s.len_k) return;  // dk/dv rows there are zero from the allocation
  const int offset = s.len_k - s.len_q;
  int q_lo, q_hi;
  query_range(p, s, offset, n0, min(n0 + kBwdBlockN, s.len_k) - 1, q_lo, q_hi);
  const int mb_lo = q_lo / kBwdBlockM;
  const int n_mb = q_hi > q_lo ? ceil_div(q_hi, kBwdBlockM) - mb_lo : 0;

  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride +
                   (s.k_row0 + n0) * p.k_row_stride;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride +
                   (s.k_row0 + n0) * p.v_row_stride;
  const int tid = threadIdx.x;
  const int c0 = tid, c1 = tid + kThreads;
  const float scale = p.scale;

  for (int idx = tid; idx < kBwdBlockN * D; idx += kThreads) {
    const int r = idx / D, c = idx - r * D;
    const bool ok = r < s.len_k - n0;
    sK[r * pitch + c] = ok ? k[r * p.k_row_stride + c] : 0.f;
    sV[r * pitch + c] = ok ? v[r * p.v_row_stride + c] : 0.f;
  }
  float dk[kBwdBlockN][2], dv[kBwdBlockN][2];
#pragma unroll
  for (int j = 0; j < kBwdBlockN; ++j) dk[j][0] = dk[j][1] = dv[j][0] = dv[j][1] = 0.f;

  for (int it = 0; it < n_mb * p.group; ++it) {
    const int h = hk * p.group + it / n_mb, m0 = (mb_lo + it % n_mb) * kBwdBlockM;
    const float bias = head_bias(p, h, s.len_k), slope = alibi_slope(p, b, h);
    const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                     (s.q_row0 + m0) * p.q_row_stride;
    const float* dout = static_cast<const float*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                        (s.q_row0 + m0) * p.do_row_stride;
    __syncthreads();  // the previous iteration's readers are done (first pass: sK, sV are written)
    for (int idx = tid; idx < kBwdBlockM * D; idx += kThreads) {
      const int r = idx / D, c = idx - r * D;
      const bool ok = r < s.len_q - m0;
      sQ[r * pitch + c] = ok ? q[r * p.q_row_stride + c] : 0.f;
      sdO[r * pitch + c] = ok ? dout[r * p.do_row_stride + c] : 0.f;
    }
    __syncthreads();
    {
      const int j = tid % kBwdBlockN;
#pragma unroll
      for (int i = 0; i < kBwdBlockM / (kThreads / kBwdBlockN); ++i) {
        const int r = tid / kBwdBlockN + i * (kThreads / kBwdBlockN);
        float dot = 0.f, dpv = 0.f;
        for (int c = 0; c < D; ++c) {
          dot = fmaf(sQ[r * pitch + c], sK[j * pitch + c], dot);
          dpv = fmaf(sdO[r * pitch + c], sV[j * pitch + c], dpv);
        }
        int dist;
        const bool ok = allowed(p, s, offset, m0 + r, n0 + j, dist);
        const float pr = ok ? sigmoid_fast(fmaf(dot, scale, bias) - slope * static_cast<float>(abs(dist))) : 0.f;
        sP[r * kBwdPitchP + j] = pr;
        sdS[r * kBwdPitchP + j] = dpv * pr * (1.f - pr);
      }
    }
    __syncthreads();
    for (int r = 0; r < kBwdBlockM; ++r) {
      const float o0 = c0 < D ? sdO[r * pitch + c0] : 0.f, o1 = c1 < D ? sdO[r * pitch + c1] : 0.f;
      const float q0 = c0 < D ? sQ[r * pitch + c0] : 0.f, q1 = c1 < D ? sQ[r * pitch + c1] : 0.f;
#pragma unroll
      for (int j = 0; j < kBwdBlockN; ++j) {
        const float pr = sP[r * kBwdPitchP + j], ds = sdS[r * kBwdPitchP + j];
        dv[j][0] = fmaf(pr, o0, dv[j][0]);
        dv[j][1] = fmaf(pr, o1, dv[j][1]);
        dk[j][0] = fmaf(ds, q0, dk[j][0]);
        dk[j][1] = fmaf(ds, q1, dk[j][1]);
      }
    }
    float* dq = p.dq_accum + b * p.o_batch_stride + h * p.o_head_stride + (s.q_row0 + m0) * p.o_row_stride;
    for (int r = 0; r < kBwdBlockM && r < s.len_q - m0; ++r) {
      float a0 = 0.f, a1 = 0.f;
#pragma unroll
      for (int j = 0; j < kBwdBlockN; ++j) {
        const float ds = sdS[r * kBwdPitchP + j];
        a0 = fmaf(ds, c0 < D ? sK[j * pitch + c0] : 0.f, a0);
        a1 = fmaf(ds, c1 < D ? sK[j * pitch + c1] : 0.f, a1);
      }
      if (c0 < D) atomicAdd(dq + r * p.o_row_stride + c0, scale * a0);
      if (c1 < D) atomicAdd(dq + r * p.o_row_stride + c1, scale * a1);
    }
  }

  const int64_t out_off = b * p.dk_batch_stride + hk * p.dk_head_stride + (s.k_row0 + n0) * p.dk_row_stride;
  float* dk_out = static_cast<float*>(p.dk) + out_off;
  float* dv_out = static_cast<float*>(p.dv) + out_off;
#pragma unroll
  for (int j = 0; j < kBwdBlockN; ++j) {
    if (j < s.len_k - n0) {
      if (c0 < D) {
        dk_out[j * p.dk_row_stride + c0] = scale * dk[j][0];
        dv_out[j * p.dk_row_stride + c0] = dv[j][0];
      }
      if (c1 < D) {
        dk_out[j * p.dk_row_stride + c1] = scale * dk[j][1];
        dv_out[j * p.dk_row_stride + c1] = dv[j][1];
      }
    }
  }
}

cudaError_t set_smem(const void* kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace
}  // namespace detail

int64_t fwd_fp32_smem_bytes(int head_dim) {
  using namespace detail;
  return static_cast<int64_t>((kFwdBlockM + 2 * kFwdBlockN) * pitch_of(head_dim) + kFwdBlockM * kFwdBlockN) *
         static_cast<int64_t>(sizeof(float));
}

int64_t bwd_fp32_smem_bytes(int head_dim) {
  using namespace detail;
  return static_cast<int64_t>(2 * (kBwdBlockN + kBwdBlockM) * pitch_of(head_dim) + 2 * kBwdBlockM * kBwdPitchP) *
         static_cast<int64_t>(sizeof(float));
}

cudaError_t run_fwd_fp32(const Params& p, cudaStream_t stream) {
  using namespace detail;
  const int64_t smem = fwd_fp32_smem_bytes(p.head_dim);
  const cudaError_t e = set_smem(reinterpret_cast<const void*>(&sigmoid_attention_fwd_fp32_kernel), smem);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_len_q, kFwdBlockM)), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  ACCEL_LAUNCH(sigmoid_attention_fwd_fp32_kernel, grid, kThreads, smem, stream, p);
  return cudaGetLastError();
}

cudaError_t run_bwd_fp32(const Params& p, cudaStream_t stream) {
  using namespace detail;
  const int64_t smem = bwd_fp32_smem_bytes(p.head_dim);
  const cudaError_t e = set_smem(reinterpret_cast<const void*>(&sigmoid_attention_bwd_fp32_kernel), smem);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_len_k, kBwdBlockN)), static_cast<unsigned>(p.heads_kv),
                  static_cast<unsigned>(p.batch));
  ACCEL_LAUNCH(sigmoid_attention_bwd_fp32_kernel, grid, kThreads, smem, stream, p);
  return cudaGetLastError();
}

TileShape fwd_tile_shape(int bucket) {
  using namespace detail;
  switch (bucket) {
#define FWD_SHAPE_CASE(D) \
  case D: return {FwdConfig<D>::kBlockM, FwdConfig<D>::kBlockN, FwdConfig<D>::kThreads, FwdConfig<D>::kSmemBytes};
    FWD_SHAPE_CASE(32) FWD_SHAPE_CASE(64) FWD_SHAPE_CASE(96) FWD_SHAPE_CASE(128)
    FWD_SHAPE_CASE(160) FWD_SHAPE_CASE(192) FWD_SHAPE_CASE(224) FWD_SHAPE_CASE(256)
#undef FWD_SHAPE_CASE
    default: return {0, 0, 0, 0};
  }
}

TileShape bwd_tile_shape(int bucket) {
  using namespace detail;
  switch (bucket) {
#define BWD_SHAPE_CASE(D) \
  case D: return {BwdConfig<D>::kBlockM, BwdConfig<D>::kBlockN, BwdConfig<D>::kThreads, BwdConfig<D>::kSmemBytes};
    BWD_SHAPE_CASE(32) BWD_SHAPE_CASE(64) BWD_SHAPE_CASE(96) BWD_SHAPE_CASE(128)
    BWD_SHAPE_CASE(160) BWD_SHAPE_CASE(192) BWD_SHAPE_CASE(224) BWD_SHAPE_CASE(256)
#undef BWD_SHAPE_CASE
    default: return {0, 0, 0, 0};
  }
}

}  // namespace accel::sigmoid_attention::cuda
