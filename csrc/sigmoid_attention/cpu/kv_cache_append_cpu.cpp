// CPU backend of accel::kv_cache_append: the checks (every row must fit) run before anything is
// written, then the (batch, head, token) rows of k and v are copied in parallel. The copy moves
// bytes, so one path serves every dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "sigmoid_attention/sigmoid_attention.h"

namespace accel::sigmoid_attention {
namespace {

// A task copies at least this many bytes: waking threads costs more than copying a decode step's
// rows, so only prefill-sized appends run in parallel.
constexpr int64_t kMinBytesPerTask = 1024 * 1024;

// Byte view of a (B, H, L, D) tensor: base pointer and byte strides.
struct Rows {
  char* base;
  int64_t sb, sh, sl, sd;
  Rows(const at::Tensor& t, int64_t es)
      : base(static_cast<char*>(t.data_ptr())),
        sb(t.stride(0) * es), sh(t.stride(1) * es), sl(t.stride(2) * es), sd(t.stride(3) * es) {}
  char* row(int64_t b, int64_t h, int64_t l) const { return base + b * sb + h * sh + l * sl; }
};

void copy_row(char* dst, int64_t dst_sd, const char* src, int64_t src_sd, int64_t n, int64_t es) {
  if (dst_sd == es && src_sd == es) {
    std::memcpy(dst, src, static_cast<size_t>(n * es));
    return;
  }
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * dst_sd, src + i * src_sd, static_cast<size_t>(es));
}

void kv_cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                         const at::Tensor& v_new, const at::Tensor& cache_seqlens) {
  const AppendGeometry g = check_kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens);
  const int64_t rows = g.batch * g.heads * g.new_len;
  if (rows == 0 || g.head_dim == 0) return;
  const int64_t es = k_cache.element_size();
  const Rows kc(k_cache, es), vc(v_cache, es), kn(k_new, es), vn(v_new, es);
  const int32_t* start = cache_seqlens.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / (2 * g.head_dim * es));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t t = r % g.new_len, h = (r / g.new_len) % g.heads, b = r / (g.new_len * g.heads);
      const int64_t l = start[b] + t;
      copy_row(kc.row(b, h, l), kc.sd, kn.row(b, h, t), kn.sd, g.head_dim, es);
      copy_row(vc.row(b, h, l), vc.sd, vn.row(b, h, t), vn.sd, g.head_dim, es);
    }
  });
}

}  // namespace
}  // namespace accel::sigmoid_attention

TORCH_LIBRARY_IMPL(accel, CPU, m) { m.impl("kv_cache_append", &accel::sigmoid_attention::kv_cache_append_cpu); }
