// CUDA backend of accel::fused_moe_fwd and fused_moe_bwd: the expert sort of the (token, slot)
// pairs, the per-token combines and the host code that chains them around the grouped GEMMs
// (fused_moe_gemm.cuh). The routing ops are in fused_moe_route_cuda.cu.
//
// Every allocation's size is a function of the shapes and no value is read back to the host, so
// the ops can be captured in a CUDA graph. Ids outside [0, E) never index memory: their pairs are
// dropped (no contribution, zero gradient).
//
// Pair sort (stable, deterministic, no atomics): the T k pairs are cut into chunks of 32 * iters,
// one warp each. (1) Each warp counts its chunk's pairs per expert (hist[e][chunk]); (2) one block
// scans hist in expert-major order and adds each expert's padding, which gives every (expert,
// chunk) its first sorted row, the expert offsets and the row block -> expert map; (3) each warp
// walks its chunk again in pair order and places every pair at its expert's running position
// (ranks within a warp step from __match_any_sync). Within an expert the rows are then in pair
// order, so the weight-gradient sums over an expert's rows always add in the same order.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "common/activation.h"
#include "common/checks.h"
#include "fused_moe/cuda/fused_moe_cuda.cuh"
#include "fused_moe/fused_moe.h"

namespace accel::fused_moe::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------ pair sort

constexpr int kScanThreads = 256;
constexpr int kMaxChunks = 256;  // chunks grow beyond 256 pairs so that the scan stays short

template <typename id_t>
__device__ __forceinline__ int expert_of(const id_t* ids, int64_t pair, int64_t pairs, int experts) {
  if (pair >= pairs) return -1;
  const id_t e = ids[pair];
  return (e >= 0 && e < static_cast<id_t>(experts)) ? static_cast<int>(e) : -1;
}

// hist[e * n_chunks + c] = pairs of chunk c routed to e (hist zeroed beforehand). One warp per chunk.
template <typename id_t>
__global__ void __launch_bounds__(32) sort_count_kernel(const id_t* __restrict__ ids, int64_t pairs, int experts,
                                                        int iters, int n_chunks, int* __restrict__ hist) {
  const int lane = threadIdx.x, c = blockIdx.x;
  const int64_t first = static_cast<int64_t>(c) * iters * 32;
  for (int it = 0; it < iters; ++it) {
    const int e = expert_of(ids, first + it * 32 + lane, pairs, experts);
    const unsigned group = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(group) - 1) hist[static_cast<int64_t>(e) * n_chunks + c] += __popc(group);
    __syncwarp();
  }
}

// One block: hist (counts) -> first sorted row of each (expert, chunk); offsets; row block map.
__global__ void __launch_bounds__(kScanThreads)
    sort_scan_kernel(int* __restrict__ hist, int n_chunks, int experts, int* __restrict__ pad_prefix,
                     int* __restrict__ offsets, int* __restrict__ block_expert, int n_blocks) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_tmp;
  const int tid = threadIdx.x;
  const int64_t len = static_cast<int64_t>(experts) * n_chunks;

  // (a) exclusive scan of the raw counts in expert-major order
  int carry = 0;
  for (int64_t base = 0; base < len; base += kScanThreads) {
    const int64_t i = base + tid;
    const int v = i < len ? hist[i] : 0;
    int ex, tile_total;
    BlockScan(scan_tmp).ExclusiveSum(v, ex, tile_total);
    if (i < len) hist[i] = carry + ex;
    carry += tile_total;
    __syncthreads();  // scan_tmp is reused
  }
  const int raw_total = carry;
  // (b) padding of each expert's segment to a multiple of kBlockM, scanned over the experts
  carry = 0;
  for (int base = 0; base < experts; base += kScanThreads) {
    const int e = base + tid;
    int pad = 0, start = 0;
    if (e < experts) {
      start = hist[static_cast<int64_t>(e) * n_chunks];
      const int end = e + 1 < experts ? hist[static_cast<int64_t>(e + 1) * n_chunks] : raw_total;
      const int count = end - start;
      pad = ceil_div(count, kBlockM) * kBlockM - count;
    }
    int ex, tile_total;
    BlockScan(scan_tmp).ExclusiveSum(pad, ex, tile_total);
    if (e < experts) {
      pad_prefix[e] = carry + ex;
      offsets[e] = start + carry + ex;
    }
    carry += tile_total;
    __syncthreads();
  }
  const int total = raw_total + carry;
  if (tid == 0) offsets[experts] = total;
  __syncthreads();
  // (c) chunk bases: the raw exclusive counts plus the padding of the earlier experts
  for (int64_t i = tid; i < len; i += kScanThreads) hist[i] += pad_prefix[i / n_chunks];
  // (d) row block -> expert: the last e with offsets[e] <= row (offsets[experts] = total > row)
  for (int b = tid; b < n_blocks; b += kScanThreads) {
    const int row = b * kBlockM;
    int e = -1;
    if (row < total) {
      int lo = 0, hi = experts - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= row) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      e = lo;
    }
    block_expert[b] = e;
  }
}

// Places every pair; sorted was filled with -1 beforehand (the padding rows keep it).
template <typename id_t>
__global__ void __launch_bounds__(32)
    sort_scatter_kernel(const id_t* __restrict__ ids, int64_t pairs, int experts, int iters, int n_chunks,
                        int* __restrict__ hist, int* __restrict__ sorted, int* __restrict__ pair_row) {
  const int lane = threadIdx.x, c = blockIdx.x;
  const int64_t first = static_cast<int64_t>(c) * iters * 32;
  const unsigned lower = (1u << lane) - 1u;
  for (int it = 0; it < iters; ++it) {
    const int64_t pair = first + it * 32 + lane;
    const int e = expert_of(ids, pair, pairs, experts);
    const unsigned group = __match_any_sync(kFullMask, e);
    int* slot = e >= 0 ? hist + static_cast<int64_t>(e) * n_chunks + c : nullptr;
    int pos = -1;
    if (e >= 0) {
      pos = *slot + __popc(group & lower);
      sorted[pos] = static_cast<int>(pair);
    }
    if (pair < pairs) pair_row[pair] = pos;
    __syncwarp();
    if (e >= 0 && lane == __ffs(group) - 1) *slot += __popc(group);
    __syncwarp();
  }
}

// ------------------------------------------------------------------ element-wise kernels

// out[t] = sum_j y[t k + j] over the token's kept pairs (fixed order: deterministic).
template <typename T>
__global__ void combine_kernel(const float* __restrict__ y, const int* __restrict__ pair_row, int top_k, int width,
                               T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int* rows = pair_row + t * top_k;
  const float* src = y + t * top_k * width;
  for (int h = threadIdx.x; h < width; h += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < top_k; ++j)
      if (rows[j] >= 0) s += src[static_cast<int64_t>(j) * width + h];
    out[t * width + h] = from_float<T>(s);
  }
}

// hw[row] = w_p act(g_p) u_p for the sorted rows (the B operand of dW2); padding rows are skipped
// (the GEMM reads them as zeros).
template <typename T>
__global__ void weighted_hidden_kernel(const int* __restrict__ sorted, const T* __restrict__ cache,
                                       const void* weights, bool weights_float, int inter, Activation act,
                                       T* __restrict__ hw) {
  const int64_t row = blockIdx.x;
  const int pair = sorted[row];
  if (pair < 0) return;
  const float w = pair_weight<T>(weights, weights_float, pair);
  const T* c = cache + static_cast<int64_t>(pair) * 2 * inter;
  T* dst = hw + row * inter;
  for (int i = threadIdx.x; i < inter; i += blockDim.x)
    dst[i] = from_float<T>(w * activation_forward(to_float(c[i]), act) * to_float(c[inter + i]));
}

// d topk_weights[p] = sum over the I tiles of the ZBwd partial sums of z . h (0 for dropped pairs).
template <typename W>
__global__ void dw_finish_kernel(const float* __restrict__ part, const int* __restrict__ pair_row, int64_t pairs,
                                 int tiles, W* __restrict__ dw) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int row = pair_row[p];
  float s = 0.f;
  if (row >= 0)
    for (int j = 0; j < tiles; ++j) s += part[static_cast<int64_t>(row) * tiles + j];
  dw[p] = from_float<W>(s);
}

// ------------------------------------------------------------------ host helpers

// Calls f(T{}) with T the CUDA element type of a supported hidden dtype.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kHalf:
      return f(__half{});
    case at::kBFloat16:
      return f(__nv_bfloat16{});
    case at::kFloat:
      return f(float{});
    default:
      TORCH_CHECK(false, kOp, ": internal error, unsupported dtype ", dtype);
  }
}

at::ScalarType check_cuda_dtype(const at::Tensor& hidden) {
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, kOp,
              ": the CUDA kernels take float16, bfloat16 or float32 hidden states and weights, got ", dt,
              (dt == at::kDouble ? " (float64 runs on the CPU only)" : ""));
  return dt;
}

void check_sizes(const Geometry& g) {
  constexpr int64_t kMax = std::numeric_limits<int>::max() / 2;
  const int64_t pairs = g.tokens * g.top_k;
  TORCH_CHECK(pairs + g.experts * kBlockM < kMax && g.hidden < kMax && 2 * g.inter < kMax, kOp,
              ": sizes too large for the CUDA kernels (T k = ", pairs, ", E = ", g.experts, ", H = ", g.hidden,
              ", I = ", g.inter, ")");
  TORCH_CHECK(ceil_div(static_cast<int>(std::max(g.hidden, 2 * g.inter)), kBlockN) <= 65535, kOp,
              ": H and I must be below ", 65535LL * kBlockN, " on CUDA");
}

Operand operand(const at::Tensor& t, int64_t ld, int64_t expert_stride, Gather gather) {
  Operand o;
  o.ptr = t.data_ptr();
  o.ld = ld;
  o.expert_stride = expert_stride;
  o.gather = gather;
  const int64_t vec = 16 / t.element_size();
  o.vec = reinterpret_cast<uintptr_t>(o.ptr) % 16 == 0 && ld % vec == 0 && expert_stride % vec == 0;
  return o;
}

struct SortedPairs {
  at::Tensor sorted;        // int32 (n_blocks * kBlockM): pair of each sorted row, -1: padding
  at::Tensor pair_row;      // int32 (T k): sorted row of each pair, -1: dropped (id out of range)
  at::Tensor block_expert;  // int32 (n_blocks)
  at::Tensor offsets;       // int32 (E + 1)
  int n_blocks = 0;
  int rows() const { return n_blocks * kBlockM; }
};

SortedPairs sort_pairs(const at::Tensor& ids, int64_t experts, cudaStream_t stream) {
  const int64_t pairs = ids.numel();
  const auto iopt = ids.options().dtype(at::kInt);
  SortedPairs s;
  s.n_blocks = ceil_div(static_cast<int>(pairs + experts * (kBlockM - 1)), kBlockM);
  s.sorted = at::empty({s.rows()}, iopt);
  s.pair_row = at::empty({pairs}, iopt);
  s.block_expert = at::empty({s.n_blocks}, iopt);
  s.offsets = at::empty({experts + 1}, iopt);
  const int iters = std::max<int>(8, ceil_div(static_cast<int>(pairs), 32 * kMaxChunks));
  const int n_chunks = ceil_div(static_cast<int>(pairs), 32 * iters);
  at::Tensor hist = at::zeros({experts * n_chunks}, iopt);
  at::Tensor pad_prefix = at::empty({experts}, iopt);
  C10_CUDA_CHECK(cudaMemsetAsync(s.sorted.data_ptr(), 0xff, s.sorted.nbytes(), stream));
  const int e = static_cast<int>(experts);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "fused_moe_sort", [&] {
    if (n_chunks > 0) {
      sort_count_kernel<index_t><<<n_chunks, 32, 0, stream>>>(ids.data_ptr<index_t>(), pairs, e, iters, n_chunks,
                                                              hist.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sort_scan_kernel<<<1, kScanThreads, 0, stream>>>(hist.data_ptr<int>(), n_chunks, e, pad_prefix.data_ptr<int>(),
                                                     s.offsets.data_ptr<int>(), s.block_expert.data_ptr<int>(),
                                                     s.n_blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (n_chunks > 0) {
      sort_scatter_kernel<index_t><<<n_chunks, 32, 0, stream>>>(ids.data_ptr<index_t>(), pairs, e, iters, n_chunks,
                                                                hist.data_ptr<int>(), s.sorted.data_ptr<int>(),
                                                                s.pair_row.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return s;
}

int threads_for(int64_t width) { return width >= 256 ? 256 : width >= 128 ? 128 : 64; }

template <typename T>
void combine(const at::Tensor& y, const SortedPairs& s, int64_t tokens, int64_t top_k, int64_t width, at::Tensor& out,
             cudaStream_t stream) {
  combine_kernel<T><<<static_cast<unsigned>(tokens), threads_for(width), 0, stream>>>(
      y.data_ptr<float>(), s.pair_row.data_ptr<int>(), static_cast<int>(top_k), static_cast<int>(width),
      static_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

GemmParams base_params(const Geometry& g, const SortedPairs& s, Activation act) {
  GemmParams p;
  p.top_k = static_cast<int>(g.top_k);
  p.inter = static_cast<int>(g.inter);
  p.n_blocks = s.n_blocks;
  p.experts = static_cast<int>(g.experts);
  p.sorted_pairs = s.sorted.data_ptr<int>();
  p.block_expert = s.block_expert.data_ptr<int>();
  p.expert_offsets = s.offsets.data_ptr<int>();
  p.act = act;
  return p;
}

// ------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor> fused_moe_fwd_cuda(const at::Tensor& hidden, const at::Tensor& gate_up_proj,
                                                      const at::Tensor& down_proj, const at::Tensor& topk_weights,
                                                      const at::Tensor& topk_ids, c10::string_view activation,
                                                      bool save_cache) {
  const Geometry g = check_forward(hidden, gate_up_proj, down_proj, topk_weights, topk_ids);
  const at::ScalarType dtype = check_cuda_dtype(hidden);
  const Activation act = parse_activation(std::string(activation), kOp);
  check_sizes(g);
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = g.tokens, H = g.hidden, I = g.inter, E = g.experts, k = g.top_k;
  const at::Tensor x = hidden.contiguous(), w1 = gate_up_proj.contiguous(), w2 = down_proj.contiguous();
  const at::Tensor tw = topk_weights.contiguous(), ids = topk_ids.contiguous();
  at::Tensor out = at::empty({T, H}, x.options());
  at::Tensor cache = at::empty({save_cache ? T * k : 0, 2 * I}, x.options());
  if (T == 0 || H == 0 || I == 0) {  // empty sums: zeros
    out.zero_();
    cache.zero_();
    return {out, cache};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const SortedPairs s = sort_pairs(ids, E, stream);
  at::Tensor hbuf = at::empty({s.rows(), I}, x.options());
  at::Tensor y = at::empty({T * k, H}, x.options().dtype(at::kFloat));

  GemmParams up = base_params(g, s, act);
  up.M = s.rows();
  up.N = static_cast<int>(I);
  up.K = static_cast<int>(H);
  up.a = operand(x, H, 0, Gather::Token);
  up.b = operand(w1, H, 2 * I * H, Gather::Direct);
  up.out = hbuf.data_ptr();
  up.out2 = save_cache ? cache.data_ptr() : nullptr;
  launch_gemm_fwd(dtype, GemmMode::UpFwd, up, stream);

  GemmParams down = base_params(g, s, act);
  down.M = s.rows();
  down.N = static_cast<int>(H);
  down.K = static_cast<int>(I);
  down.a = operand(hbuf, I, 0, Gather::Row);
  down.b = operand(w2, I, H * I, Gather::Direct);
  down.out = y.data_ptr();
  down.weights = tw.data_ptr();
  down.weights_float = tw.scalar_type() == at::kFloat;
  launch_gemm_fwd(dtype, GemmMode::DownFwd, down, stream);

  dispatch_dtype(dtype, [&](auto tag) { combine<decltype(tag)>(y, s, T, k, H, out, stream); });
  return {out, cache};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& cache, c10::string_view activation,
    std::array<bool, 4> output_mask) {
  const Geometry g = check_backward(grad_out, hidden, gate_up_proj, down_proj, topk_weights, topk_ids, cache);
  const at::ScalarType dtype = check_cuda_dtype(hidden);
  const Activation act = parse_activation(std::string(activation), kOp);
  check_sizes(g);
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = g.tokens, H = g.hidden, I = g.inter, E = g.experts, k = g.top_k;
  const bool want_x = output_mask[0], want_w1 = output_mask[1], want_w2 = output_mask[2], want_w = output_mask[3];
  auto grad_like = [](const at::Tensor& t, bool want) {
    return want ? at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, t.options());
  };
  at::Tensor dx = grad_like(hidden, want_x), dw1 = grad_like(gate_up_proj, want_w1);
  at::Tensor dw2 = grad_like(down_proj, want_w2), dw = grad_like(topk_weights, want_w);
  if (T == 0 || H == 0 || I == 0) {
    dx.zero_();
    dw1.zero_();
    dw2.zero_();
    dw.zero_();
    return {dx, dw1, dw2, dw};
  }
  const bool need_z = want_x || want_w1 || want_w;
  if (!need_z && !want_w2) return {dx, dw1, dw2, dw};

  const at::Tensor dout = grad_out.contiguous(), x = hidden.contiguous();
  const at::Tensor w1 = gate_up_proj.contiguous(), w2 = down_proj.contiguous();
  const at::Tensor tw = topk_weights.contiguous(), ids = topk_ids.contiguous(), gu = cache.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const SortedPairs s = sort_pairs(ids, E, stream);
  const bool w_float = tw.scalar_type() == at::kFloat;

  at::Tensor dgu;
  if (need_z) {
    // z = dout W2[e] per pair row -> dg|du (sorted rows), z . h partial sums per I tile
    const int tiles = ceil_div(static_cast<int>(I), kBlockN);
    dgu = at::empty({s.rows(), 2 * I}, x.options());
    at::Tensor part = at::empty({s.rows(), tiles}, x.options().dtype(at::kFloat));
    GemmParams zp = base_params(g, s, act);
    zp.M = s.rows();
    zp.N = static_cast<int>(I);
    zp.K = static_cast<int>(H);
    zp.a = operand(dout, H, 0, Gather::Token);
    zp.b = operand(w2, I, H * I, Gather::Direct);  // line h of W2[e], contiguous along i
    zp.out = dgu.data_ptr();
    zp.cache = gu.data_ptr();
    zp.weights = tw.data_ptr();
    zp.weights_float = w_float;
    zp.dw_part = part.data_ptr<float>();
    launch_gemm_bwd(dtype, GemmMode::ZBwd, zp, stream);
    if (want_w) {
      const unsigned blocks = static_cast<unsigned>((T * k + 255) / 256);
      if (w_float) {
        dw_finish_kernel<float><<<blocks, 256, 0, stream>>>(part.data_ptr<float>(), s.pair_row.data_ptr<int>(),
                                                            T * k, tiles, dw.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        dispatch_dtype(dtype, [&](auto tag) {
          using W = decltype(tag);
          dw_finish_kernel<W><<<blocks, 256, 0, stream>>>(part.data_ptr<float>(), s.pair_row.data_ptr<int>(), T * k,
                                                          tiles, static_cast<W*>(dw.data_ptr()));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    }
  }
  if (want_x) {
    // per-pair rows [dg; du] W1[e], then the per-token sum
    at::Tensor ydx = at::empty({T * k, H}, x.options().dtype(at::kFloat));
    GemmParams xp = base_params(g, s, act);
    xp.M = s.rows();
    xp.N = static_cast<int>(H);
    xp.K = static_cast<int>(2 * I);
    xp.a = operand(dgu, 2 * I, 0, Gather::Row);
    xp.b = operand(w1, H, 2 * I * H, Gather::Direct);  // line n of W1[e], contiguous along h
    xp.out = ydx.data_ptr();
    launch_gemm_bwd(dtype, GemmMode::DxBwd, xp, stream);
    dispatch_dtype(dtype, [&](auto tag) { combine<decltype(tag)>(ydx, s, T, k, H, dx, stream); });
  }
  if (want_w2) {
    // dW2[e] = sum over e's rows of dout[tok]^T (w h)
    at::Tensor hw = at::empty({s.rows(), I}, x.options());
    dispatch_dtype(dtype, [&](auto tag) {
      using T_ = decltype(tag);
      weighted_hidden_kernel<T_><<<static_cast<unsigned>(s.rows()), threads_for(I), 0, stream>>>(
          s.sorted.data_ptr<int>(), static_cast<const T_*>(gu.data_ptr()), tw.data_ptr(), w_float,
          static_cast<int>(I), act, static_cast<T_*>(hw.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    GemmParams wp = base_params(g, s, act);
    wp.M = static_cast<int>(H);
    wp.N = static_cast<int>(I);
    wp.a = operand(dout, H, 0, Gather::Token);
    wp.b = operand(hw, I, 0, Gather::Row);
    wp.out = dw2.data_ptr();
    launch_gemm_wgrad(dtype, wp, stream);
  }
  if (want_w1) {
    // dW1[e] = sum over e's rows of [dg; du]^T x[tok]
    GemmParams wp = base_params(g, s, act);
    wp.M = static_cast<int>(2 * I);
    wp.N = static_cast<int>(H);
    wp.a = operand(dgu, 2 * I, 0, Gather::Row);
    wp.b = operand(x, H, 0, Gather::Token);
    wp.out = dw1.data_ptr();
    launch_gemm_wgrad(dtype, wp, stream);
  }
  return {dx, dw1, dw2, dw};
}

}  // namespace
}  // namespace accel::fused_moe::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) {
  m.impl("fused_moe_fwd", &accel::fused_moe::cuda::fused_moe_fwd_cuda);
  m.impl("fused_moe_bwd", &accel::fused_moe::cuda::fused_moe_bwd_cuda);
}
