// CUDA backend of accel::kv_cache_append. The kernel reads cache_seqlens on the device, so the op
// never synchronises with the host and can be captured in a CUDA graph whose lengths advance
// between replays. A batch entry whose new rows would not fit ([0, L_max - L_new]) is skipped:
// nothing is written out of bounds, and the attention kernels clamp such a length the same way.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "sigmoid_attention/sigmoid_attention.h"

namespace accel::sigmoid_attention::cuda {
namespace {

constexpr int kThreads = 128;
// Rows are visited by a grid-stride loop; more blocks than this add no parallelism for a copy.
constexpr int64_t kMaxBlocks = 65536;

// Element strides of a (B, H, L, D) tensor.
struct Strides {
  int64_t b, h, l, d;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

struct AppendArgs {
  int64_t heads, new_len, max_len, head_dim, rows;
  Strides kc, vc, kn, vn;
};

__device__ __forceinline__ int64_t offset(const Strides& s, int64_t b, int64_t h, int64_t l, int64_t d) {
  return b * s.b + h * s.h + l * s.l + d * s.d;
}

// One block per (batch, head, new token) row at a time; T is an unsigned integer of the element's
// size, so one instantiation serves every dtype of that size.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kv_cache_append_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k_new,
                           const T* __restrict__ v_new, const int32_t* __restrict__ cache_seqlens, AppendArgs a) {
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const int64_t t = r % a.new_len, h = (r / a.new_len) % a.heads, b = r / (a.new_len * a.heads);
    const int64_t start = cache_seqlens[b];
    if (start < 0 || start + a.new_len > a.max_len) continue;
    for (int64_t d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
      k_cache[offset(a.kc, b, h, start + t, d)] = k_new[offset(a.kn, b, h, t, d)];
      v_cache[offset(a.vc, b, h, start + t, d)] = v_new[offset(a.vn, b, h, t, d)];
    }
  }
}

template <typename T>
void launch(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
            const at::Tensor& cache_seqlens, const AppendArgs& a) {
  const int blocks = static_cast<int>(std::min(a.rows, kMaxBlocks));
  kv_cache_append_kernel<T><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<T*>(k_cache.data_ptr()), static_cast<T*>(v_cache.data_ptr()),
      static_cast<const T*>(k_new.const_data_ptr()), static_cast<const T*>(v_new.const_data_ptr()),
      cache_seqlens.const_data_ptr<int32_t>(), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kv_cache_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                          const at::Tensor& v_new, const at::Tensor& cache_seqlens) {
  const AppendGeometry g = check_kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens);
  const AppendArgs a{g.heads, g.new_len, g.max_len, g.head_dim, g.batch * g.heads * g.new_len,
                     strides_of(k_cache), strides_of(v_cache), strides_of(k_new), strides_of(v_new)};
  if (a.rows == 0 || a.head_dim == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  switch (k_cache.element_size()) {
    case 1: launch<uint8_t>(k_cache, v_cache, k_new, v_new, cache_seqlens, a); break;
    case 2: launch<uint16_t>(k_cache, v_cache, k_new, v_new, cache_seqlens, a); break;
    case 4: launch<uint32_t>(k_cache, v_cache, k_new, v_new, cache_seqlens, a); break;
    case 8: launch<uint64_t>(k_cache, v_cache, k_new, v_new, cache_seqlens, a); break;
    default:
      TORCH_CHECK_TYPE(false, kAppendOp, ": the CUDA kernel copies 1-, 2-, 4- or 8-byte elements, got ",
                       k_cache.scalar_type());
  }
}

}  // namespace
}  // namespace accel::sigmoid_attention::cuda

TORCH_LIBRARY_IMPL(accel, CUDA, m) { m.impl("kv_cache_append", &accel::sigmoid_attention::cuda::kv_cache_append_cuda); }
