// Vectorised building blocks shared by accel's CPU kernels (ATen's Vectorized<T>, compiled for
// the build's baseline ISA).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/activation.h"
#include "common/cpu_avx2_math.h"

namespace accel::cpu {

using at::vec::Vectorized;

// How many slices to cut a reduction's (batch, time) range into so that `tasks * slices` gives
// every thread about `per_thread` tasks even when there are few channels or groups; the partial
// results of the slices are summed afterwards (no atomics). A power of two, at most work_units.
inline int64_t split_count(int64_t tasks, int64_t work_units, int64_t per_thread) {
  const int64_t threads = at::get_num_threads();
  int64_t split = 1;
  while (tasks * split < per_thread * threads && split * 2 <= work_units) split *= 2;
  return split;
}

// dst[0, n) = src[0, n), converting the element type. ATen vectorises float -> bf16/fp16 but its
// generic bf16/fp16 -> float convert is an element loop, so that direction is done here.
template <typename src_t, typename dst_t>
inline void convert_n(const src_t* src, dst_t* dst, int64_t n) {
  if (n <= 0) return;
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::memcpy(dst, src, n * sizeof(dst_t));
  } else if constexpr (std::is_same_v<dst_t, float> &&
                       (std::is_same_v<src_t, c10::BFloat16> || std::is_same_v<src_t, c10::Half>)) {
    using lVec = Vectorized<src_t>;
    using fVec = Vectorized<float>;
    int64_t i = 0;
    for (; i + lVec::size() <= n; i += lVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<src_t>(lVec::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + fVec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// buf[0, n) = row[start, start + n) as acc_t, zero where the index falls outside [0, len).
template <typename in_t, typename acc_t>
inline void load_padded(const in_t* row, int64_t len, int64_t start, int64_t n, acc_t* buf) {
  const int64_t lo = std::clamp<int64_t>(-start, 0, n);
  const int64_t hi = std::clamp<int64_t>(len - start, lo, n);
  std::fill(buf, buf + lo, acc_t(0));
  if (hi > lo) convert_n(row + start + lo, buf + lo, hi - lo);
  std::fill(buf + hi, buf + n, acc_t(0));
}

// exp for the activation epilogues: fp32 on AVX2 as 2^(x log2 e) by cpu::exp2_avx2 (the exponent
// clamped to +-126, so exp(-z) of a very negative z is finite and SiLU's z / (1 + exp(-z)) comes
// out 0; about 3e-7 relative, inline, against ATen's exp_u20 at about twice the cost and an
// out-of-line Sleef call per vector for exp); other types Vectorized<T>::exp.
template <typename T>
inline Vectorized<T> exp_fast(const Vectorized<T>& x) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float> && Vectorized<T>::size() == 8) {
    return exp2_avx2(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)));
  }
#endif
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// erf for the activation epilogues. fp32: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7) with
// exp_fast, cheaper than Vectorized<float>::erf (which calls Sleef's expf out of
// line); the input is clamped to |x| <= 4, where erf is 1 in fp32. Other types: ATen's.
template <typename T>
inline Vectorized<T> erf_vec(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    using Vec = Vectorized<float>;
    const Vec one(1.f);
    const Vec a = at::vec::minimum(x.abs(), Vec(4.f));
    const Vec t = one / at::vec::fmadd(Vec(kErfAS[0]), a, one);
    Vec poly = at::vec::fmadd(Vec(kErfAS[5]), t, Vec(kErfAS[4]));
    poly = at::vec::fmadd(poly, t, Vec(kErfAS[3]));
    poly = at::vec::fmadd(poly, t, Vec(kErfAS[2]));
    poly = at::vec::fmadd(poly, t, Vec(kErfAS[1])) * t;
    const Vec y = one - poly * exp_fast((a * a).neg());
    return Vec::blendv(y, y.neg(), x < Vec(0.f));
  } else {
    return x.erf();
  }
}

// exp(-0.5 z^2), the Gaussian kernel in GELU's derivative; the argument is clamped where the
// result underflows anyway.
template <typename T>
inline Vectorized<T> gauss_vec(const Vectorized<T>& z) {
  using Vec = Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) {
    return exp_fast(Vec(-0.5f) * at::vec::minimum(z * z, Vec(160.f)));
  } else {
    return (Vec(T(-0.5)) * z * z).exp();
  }
}

// The activation fixed at compile time, for loops that dispatch once outside (inlined, so that
// successive vectors' chains overlap).
template <Activation kAct, typename T>
C10_ALWAYS_INLINE Vectorized<T> activation_vec(Vectorized<T> z) {
  using Vec = Vectorized<T>;
  if constexpr (kAct == Activation::Relu) {
    return at::vec::clamp_min(z, Vec(T(0)));
  } else if constexpr (kAct == Activation::Gelu) {
    return Vec(T(0.5)) * z * (Vec(T(1)) + erf_vec(z * Vec(T(0.70710678118654752440))));
  } else if constexpr (kAct == Activation::Silu) {
    return z / (Vec(T(1)) + exp_fast(z.neg()));
  } else {
    return z;
  }
}

template <typename T>
inline Vectorized<T> activation_vec(Vectorized<T> z, Activation a) {
  switch (a) {
    case Activation::Relu:
      return activation_vec<Activation::Relu>(z);
    case Activation::Gelu:
      return activation_vec<Activation::Gelu>(z);
    case Activation::Silu:
      return activation_vec<Activation::Silu>(z);
    default:
      return z;
  }
}

// f(std::integral_constant<Activation, a>{}): one instantiation per activation.
template <typename F>
C10_ALWAYS_INLINE decltype(auto) with_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Relu:
      return f(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Gelu:
      return f(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::Silu:
      return f(std::integral_constant<Activation, Activation::Silu>{});
    default:
      return f(std::integral_constant<Activation, Activation::None>{});
  }
}

template <typename T>
inline Vectorized<T> activation_grad_vec(Vectorized<T> z, Activation a) {
  using Vec = Vectorized<T>;
  switch (a) {
    case Activation::Relu:
      return Vec::blendv(Vec(T(0)), Vec(T(1)), z > Vec(T(0)));
    case Activation::Gelu: {
      const Vec cdf = Vec(T(0.5)) * (Vec(T(1)) + erf_vec(z * Vec(T(0.70710678118654752440))));
      const Vec pdf = gauss_vec(z) * Vec(T(0.39894228040143267794));
      return cdf + z * pdf;
    }
    case Activation::Silu: {
      const Vec s = Vec(T(1)) / (Vec(T(1)) + exp_fast(z.neg()));
      return s * (Vec(T(1)) + z * (Vec(T(1)) - s));
    }
    default:
      return Vec(T(1));
  }
}

// a[i] = act(a[i]) (+ res[i])
template <typename acc_t>
inline void apply_epilogue(acc_t* a, const acc_t* res, int64_t n, Activation act) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  if (act == Activation::None && res == nullptr) return;
  with_activation(act, [&](auto kAct) {
    int64_t i = 0;
    for (; i + V <= n; i += V) {
      Vec z = activation_vec<decltype(kAct)::value>(Vec::loadu(a + i));
      if (res) z = z + Vec::loadu(res + i);
      z.store(a + i);
    }
    for (; i < n; ++i) a[i] = activation_forward(a[i], act) + (res ? res[i] : acc_t(0));
  });
}

// g[i] = g[i] * act'(z[i]), in place on g
template <typename acc_t>
inline void apply_activation_grad(acc_t* g, const acc_t* z, int64_t n, Activation act) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) (Vec::loadu(g + i) * activation_grad_vec(Vec::loadu(z + i), act)).store(g + i);
  for (; i < n; ++i) g[i] *= activation_grad(z[i], act);
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + i + V), Vec::loadu(b + i + V), s1);
    s2 = at::vec::fmadd(Vec::loadu(a + i + 2 * V), Vec::loadu(b + i + 2 * V), s2);
    s3 = at::vec::fmadd(Vec::loadu(a + i + 3 * V), Vec::loadu(b + i + 3 * V), s3);
  }
  for (; i + V <= n; i += V) s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, (s0 + s1) + (s2 + s3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc_t>
inline acc_t sum(const acc_t* a, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    s0 = s0 + Vec::loadu(a + i);
    s1 = s1 + Vec::loadu(a + i + V);
  }
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, s0 + s1);
  for (; i < n; ++i) s += a[i];
  return s;
}

}  // namespace accel::cpu
