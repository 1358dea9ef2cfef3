// CPU reductions over the untouched channels c >= Cp of a (B, C, H, W) tensor, one pair of sums
// per (b, c) plane, for PAT_ch: its statistics (partial_conv2d_stats) and the gradients of the
// per-plane scale and shift (partial_conv2d_backward).
//
// Planes whose rows are contiguous (NCHW) are one task each, the row in the vector lanes; in
// channels_last the lanes hold 2V neighbouring channels and a task is a block of them over a range
// of pixels (ranges summed afterwards in a fixed order, so results do not depend on scheduling).
// The statistics sum x - k and (x - k)^2 with k the plane's first value: the shift keeps the sum
// of squares from cancelling when |mean| >> std.
#include "partial_conv2d/cpu/untouched_sums.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/cpu_vec.h"
#include "common/parallel.h"
#include "partial_conv2d/partial_conv2d.h"

namespace accel::partial_conv2d {
namespace {

using at::Tensor;
using namespace accel::cpu;
using at::vec::Vectorized;

constexpr int64_t kTasksPerThread = 4;
constexpr int64_t kMinPixelsPerTask = 256;  // below, a pixel range costs more to schedule than to sum

template <typename T>
struct Planes {
  const T* p;
  int64_t sb, sc, sh, sw;
  explicit Planes(const Tensor& t)
      : p(t.const_data_ptr<T>()), sb(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  const T* at(int64_t b, int64_t c, int64_t y, int64_t x) const { return p + b * sb + c * sc + y * sh + x * sw; }
};

// 2V consecutive elements (fewer at a tail: the rest read as 0) as two acc_t vectors.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void load2(const scalar_t* p, int64_t n, Vectorized<acc_t>& lo, Vectorized<acc_t>& hi) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n >= 2 * V) {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + V);
    } else {
      lo = n >= V ? Vec::loadu(p) : Vec::loadu(p, n);
      hi = n > V ? Vec::loadu(p + V, n - V) : Vec(acc_t(0));
    }
  } else {
    static_assert(Vectorized<scalar_t>::size() == 2 * V, "a reduced-precision vector widens to two");
    const auto v = n >= 2 * V ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(v);
  }
}

// s1 += sum(a * b), s2 += sum(a) over n contiguous elements (kStats: s1 += sum(a - k),
// s2 += sum((a - k)^2)), two vector accumulators per sum.
template <bool kStats, typename scalar_t, typename acc_t>
void row_sums(const scalar_t* a, const scalar_t* b, int64_t n, acc_t k, acc_t& s1, acc_t& s2) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec kv(k);
  Vec p0(0), p1(0), q0(0), q1(0);
  for (int64_t i = 0; i < n; i += 2 * V) {
    const int64_t m = std::min<int64_t>(2 * V, n - i);
    Vec a0, a1;
    load2<scalar_t, acc_t>(a + i, m, a0, a1);
    if constexpr (kStats) {
      // lanes past the tail read 0: subtract k only where a value was read
      if (m < 2 * V) {
        const Vec d0 = Vec::set(Vec(0), a0 - kv, std::min<int64_t>(m, V));
        const Vec d1 = m > V ? Vec::set(Vec(0), a1 - kv, m - V) : Vec(0);
        p0 = p0 + d0, p1 = p1 + d1;
        q0 = at::vec::fmadd(d0, d0, q0), q1 = at::vec::fmadd(d1, d1, q1);
        continue;
      }
      const Vec d0 = a0 - kv, d1 = a1 - kv;
      p0 = p0 + d0, p1 = p1 + d1;
      q0 = at::vec::fmadd(d0, d0, q0), q1 = at::vec::fmadd(d1, d1, q1);
    } else {
      Vec b0, b1;
      load2<scalar_t, acc_t>(b + i, m, b0, b1);
      p0 = at::vec::fmadd(a0, b0, p0), p1 = at::vec::fmadd(a1, b1, p1);
      q0 = q0 + a0, q1 = q1 + a1;
    }
  }
  s1 += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), p0 + p1);
  s2 += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), q0 + q1);
}

template <bool kStats, typename scalar_t>
void sums_impl(const Tensor& a_t, const Tensor* b_t, int64_t cp, at::opmath_type<scalar_t>* s1,
               at::opmath_type<scalar_t>* s2) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t B = a_t.size(0), Cu = a_t.size(1) - cp, H = a_t.size(2), W = a_t.size(3), N = H * W;
  const Planes<scalar_t> a(a_t), b(b_t ? *b_t : a_t);
  const int64_t threads = at::get_num_threads();
  if (a.sw == 1 && b.sw == 1) {  // rows in the lanes, a task per plane
    parallel_task_workers(B * Cu, [&](TaskCursor& next) {
      for (int64_t t = next.next(); t >= 0; t = next.next()) {
        const int64_t bi = t / Cu, c = cp + t % Cu;
        const acc_t k = kStats ? static_cast<acc_t>(*a.at(bi, c, 0, 0)) : acc_t(0);
        acc_t p = 0, q = 0;
        if (a.sh == W && b.sh == W) {  // the plane is one run (NCHW)
          row_sums<kStats, scalar_t, acc_t>(a.at(bi, c, 0, 0), b.at(bi, c, 0, 0), N, k, p, q);
        } else {
          for (int64_t y = 0; y < H; ++y) {
            row_sums<kStats, scalar_t, acc_t>(a.at(bi, c, y, 0), b.at(bi, c, y, 0), W, k, p, q);
          }
        }
        s1[t] = p, s2[t] = q;
      }
    });
    return;
  }
  if (a.sc == 1 && b.sc == 1) {  // channels_last: 2V channels in the lanes over a range of pixels
    const int64_t blocks = (Cu + 2 * V - 1) / (2 * V);
    const int64_t splits = std::clamp<int64_t>((kTasksPerThread * threads + B * blocks - 1) / (B * blocks), 1,
                                               std::max<int64_t>(1, N / kMinPixelsPerTask));
    std::vector<acc_t> part(splits * B * Cu * 2);
    parallel_task_workers(B * blocks * splits, [&](TaskCursor& next) {
      for (int64_t t = next.next(); t >= 0; t = next.next()) {
        const int64_t s = t % splits, blk = (t / splits) % blocks, bi = t / (splits * blocks);
        const int64_t c0 = cp + blk * 2 * V, m = std::min<int64_t>(2 * V, cp + Cu - c0);
        Vec k0(0), k1(0);
        if (kStats) load2<scalar_t, acc_t>(a.at(bi, c0, 0, 0), m, k0, k1);
        Vec p0(0), p1(0), q0(0), q1(0);
        for (int64_t i = N * s / splits; i < N * (s + 1) / splits; ++i) {
          const int64_t y = i / W, x = i % W;
          Vec a0, a1;
          load2<scalar_t, acc_t>(a.at(bi, c0, y, x), m, a0, a1);
          if constexpr (kStats) {
            const Vec d0 = a0 - k0, d1 = a1 - k1;  // lanes past m: 0 - 0
            p0 = p0 + d0, p1 = p1 + d1;
            q0 = at::vec::fmadd(d0, d0, q0), q1 = at::vec::fmadd(d1, d1, q1);
          } else {
            Vec b0, b1;
            load2<scalar_t, acc_t>(b.at(bi, c0, y, x), m, b0, b1);
            p0 = at::vec::fmadd(a0, b0, p0), p1 = at::vec::fmadd(a1, b1, p1);
            q0 = q0 + a0, q1 = q1 + a1;
          }
        }
        acc_t buf[4 * V];
        p0.store(buf), p1.store(buf + V), q0.store(buf + 2 * V), q1.store(buf + 3 * V);
        acc_t* dst = part.data() + (s * B * Cu + bi * Cu + (c0 - cp)) * 2;
        for (int64_t j = 0; j < m; ++j) dst[2 * j] = buf[j], dst[2 * j + 1] = buf[2 * V + j];
      }
    });
    for (int64_t i = 0; i < B * Cu; ++i) {
      acc_t p = 0, q = 0;
      for (int64_t s = 0; s < splits; ++s) p += part[(s * B * Cu + i) * 2], q += part[(s * B * Cu + i) * 2 + 1];
      s1[i] = p, s2[i] = q;
    }
    return;
  }
  // any other strides: element by element
  at::parallel_for(0, B * Cu, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / Cu, c = cp + t % Cu;
      const acc_t k = kStats ? static_cast<acc_t>(*a.at(bi, c, 0, 0)) : acc_t(0);
      acc_t p = 0, q = 0;
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t x = 0; x < W; ++x) {
          const acc_t v = static_cast<acc_t>(*a.at(bi, c, y, x));
          if constexpr (kStats) {
            p += v - k, q += (v - k) * (v - k);
          } else {
            p += v * static_cast<acc_t>(*b.at(bi, c, y, x)), q += v;
          }
        }
      }
      s1[t] = p, s2[t] = q;
    }
  });
}


std::tuple<Tensor, Tensor> partial_conv2d_stats_cpu(const Tensor& x, int64_t dim_conv) {
  const Geometry g = check_stats(x, dim_conv);
  check_cpu_dtype(kStatsOp, x);
  const int64_t Cu = g.channels - g.cp, N = g.height * g.width;
  Tensor mean = at::empty({g.batch, Cu}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  Tensor std = at::empty_like(mean);
  if (N == 0) {  // torch.std_mean over an empty plane: NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN()), std.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (mean.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "partial_conv2d_stats_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* p = mean.mutable_data_ptr<acc_t>();
      acc_t* q = std.mutable_data_ptr<acc_t>();
      sums_impl<true, scalar_t>(x, nullptr, g.cp, p, q);
      // sums of d = x - k: mean = k + S1 / N, sum (x - mean)^2 = S2 - S1^2 / N
      const Planes<scalar_t> xs(x);
      for (int64_t i = 0; i < mean.numel(); ++i) {
        const acc_t k = static_cast<acc_t>(*xs.at(i / Cu, g.cp + i % Cu, 0, 0));
        const acc_t m2 = std::max<acc_t>(q[i] - p[i] * p[i] / N, acc_t(0));
        p[i] = k + p[i] / N;
        q[i] = std::sqrt(m2 / static_cast<acc_t>(N - 1));  // N = 1: 0 / 0, NaN as torch.std
      }
    });
  }
  return {mean.to(x.scalar_type()), std.to(x.scalar_type())};
}

}  // namespace

void check_cpu_dtype(const char* op, const Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16, op, ": x has dtype ", t,
                   "; the CPU kernels take float32, float64 and bfloat16");
}

void untouched_sums_cpu(const Tensor& grad_out, const Tensor& x, int64_t cp, Tensor& sum_gx, Tensor& sum_g) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "partial_conv2d_untouched_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sums_impl<false, scalar_t>(grad_out, &x, cp, sum_gx.mutable_data_ptr<acc_t>(), sum_g.mutable_data_ptr<acc_t>());
  });
}

}  // namespace accel::partial_conv2d

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("partial_conv2d_stats", &accel::partial_conv2d::partial_conv2d_stats_cpu);
}
