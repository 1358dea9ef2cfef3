// CPU kernels for accel::dilated_conv1d and its backward.
//
// Work is split into (batch, output channel, time chunk) tasks (common/parallel.h). A
// chunk of outputs is accumulated in an L1-resident fp32/fp64 buffer, four vectors at a time
// held in registers across the K taps; each tap reads the input through a pointer into the
// input row itself (fp32/fp64, in range) or into a small zero-padded, converted copy (borders,
// bf16/fp16 inputs). The epilogue fuses activation, residual and the cast back.
//
// Backward: the depthwise case (groups == C_in == C_out, the TCN layer) runs fused per channel:
// the pre-activation is recomputed chunk by chunk from the input row (no saved activation), the
// row of dz stays in L2, and dx, dweight and dbias come from it in the same task, so memory
// traffic is one read of grad_out and x and one write of dx. Other group shapes compute dz, then
// dx as the forward kernel applied to dz with the transposed weight, and dweight as dot products
// of dz chunks with the input taps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common/activation.h"
#include "common/cpu_memory.h"
#include "common/cpu_vec.h"
#include "common/parallel.h"
#include "dilated_conv1d/cpu/gemm_path.h"
#include "dilated_conv1d/dilated_conv1d.h"

namespace accel::dilated_conv1d {
namespace {

using at::Tensor;
using at::vec::Vectorized;
using namespace accel::cpu;

// Outputs per task along time: small enough that the accumulator and the tap windows stay in
// L1/L2, large enough to amortise the per-task setup.
// Outputs larger than this are written with non-temporal stores (they cannot stay in cache).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

int64_t chunk_size(int64_t kernel) {
  int64_t c = (int64_t(1) << 16) / std::max<int64_t>(kernel, 1);
  c = std::max<int64_t>(256, std::min<int64_t>(2048, c));
  return c & ~int64_t(63);
}

// Pointers to the K input segments that feed a chunk of n outputs: tap k reads
// row[start + k*d, start + k*d + n). In-range segments of an acc_t row are used in place; the
// others are staged, either as one contiguous window (when taps overlap, d < n) or one segment
// per tap (large dilations, where a contiguous window would be mostly unused).
template <typename in_t, typename acc_t>
struct TapReader {
  std::vector<acc_t> buf;
  std::vector<const acc_t*> taps;

  TapReader(int64_t kernel, int64_t chunk, int64_t dilation)
      : buf(std::max<int64_t>(kernel * chunk, chunk + (kernel - 1) * std::min(dilation, chunk)) + 16),
        taps(kernel) {}

  const acc_t* const* read(const in_t* row, int64_t len, int64_t start, int64_t n, int64_t kernel, int64_t d) {
    constexpr bool same = std::is_same_v<in_t, acc_t>;
    const int64_t span = (kernel - 1) * d;
    if (same && start >= 0 && start + span + n <= len) {
      for (int64_t k = 0; k < kernel; ++k) taps[k] = reinterpret_cast<const acc_t*>(row) + start + k * d;
      return taps.data();
    }
    if (d < n) {
      load_padded(row, len, start, n + span, buf.data());
      for (int64_t k = 0; k < kernel; ++k) taps[k] = buf.data() + k * d;
      return taps.data();
    }
    for (int64_t k = 0; k < kernel; ++k) {
      const int64_t s = start + k * d;
      if (same && s >= 0 && s + n <= len) {
        taps[k] = reinterpret_cast<const acc_t*>(row) + s;
      } else {
        load_padded(row, len, s, n, buf.data() + k * n);
        taps[k] = buf.data() + k * n;
      }
    }
    return taps.data();
  }
};

// acc[i] += sum_k w[k] * taps[k][i] for i < n.
template <typename acc_t>
void add_taps(acc_t* acc, const acc_t* const* taps, const acc_t* w, int64_t kernel, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    Vec a0 = Vec::loadu(acc + i), a1 = Vec::loadu(acc + i + V);
    Vec a2 = Vec::loadu(acc + i + 2 * V), a3 = Vec::loadu(acc + i + 3 * V);
    for (int64_t k = 0; k < kernel; ++k) {
      const Vec wk(w[k]);
      const acc_t* p = taps[k] + i;
      a0 = at::vec::fmadd(wk, Vec::loadu(p), a0);
      a1 = at::vec::fmadd(wk, Vec::loadu(p + V), a1);
      a2 = at::vec::fmadd(wk, Vec::loadu(p + 2 * V), a2);
      a3 = at::vec::fmadd(wk, Vec::loadu(p + 3 * V), a3);
    }
    a0.store(acc + i);
    a1.store(acc + i + V);
    a2.store(acc + i + 2 * V);
    a3.store(acc + i + 3 * V);
  }
  for (; i + V <= n; i += V) {
    Vec a = Vec::loadu(acc + i);
    for (int64_t k = 0; k < kernel; ++k) a = at::vec::fmadd(Vec(w[k]), Vec::loadu(taps[k] + i), a);
    a.store(acc + i);
  }
  for (; i < n; ++i) {
    acc_t a = acc[i];
    for (int64_t k = 0; k < kernel; ++k) a += w[k] * taps[k][i];
    acc[i] = a;
  }
}

// Stores v at p; a non-temporal store when asked and p is aligned, so that an output larger
// than the caches is written without first being read into them.
template <typename acc_t>
inline void store_vec(acc_t* p, const Vectorized<acc_t>& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  if (stream && (reinterpret_cast<uintptr_t>(p) % 32) == 0) {
    if constexpr (std::is_same_v<acc_t, float>) {
      _mm256_stream_ps(p, static_cast<__m256>(v));
      return;
    } else if constexpr (std::is_same_v<acc_t, double>) {
      _mm256_stream_pd(p, static_cast<__m256d>(v));
      return;
    }
  }
#endif
  v.store(p);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
  _mm_sfence();
#endif
}

// dst[i] = act(init + sum_k w[k] * taps[k][i]) + res[i] for i < n, in registers; the output is
// written once (the single-input-channel case: depthwise forward and its dx).
// kFixedK > 0 compiles the tap loop for that many taps (weights and tap pointers then live in
// registers); kFixedK == 0 handles any K.
template <int kFixedK, typename acc_t>
void conv_chunk_direct_k(acc_t* dst, acc_t init, const acc_t* const* taps_in, const acc_t* w_in, int64_t kernel,
                         int64_t n, Activation act, const acc_t* res, bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int kSlots = kFixedK > 0 ? kFixedK : 1;
  const acc_t* taps_fixed[kSlots];
  Vec w_fixed[kSlots];
  if constexpr (kFixedK > 0) {
    for (int k = 0; k < kFixedK; ++k) {
      taps_fixed[k] = taps_in[k];
      w_fixed[k] = Vec(w_in[k]);
    }
  }
  const int64_t K = kFixedK > 0 ? kFixedK : kernel;
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    Vec a0(init), a1(init), a2(init), a3(init);
    for (int64_t k = 0; k < K; ++k) {
      const Vec wk = kFixedK > 0 ? w_fixed[kFixedK > 0 ? k : 0] : Vec(w_in[k]);
      const acc_t* p = (kFixedK > 0 ? taps_fixed[kFixedK > 0 ? k : 0] : taps_in[k]) + i;
      a0 = at::vec::fmadd(wk, Vec::loadu(p), a0);
      a1 = at::vec::fmadd(wk, Vec::loadu(p + V), a1);
      a2 = at::vec::fmadd(wk, Vec::loadu(p + 2 * V), a2);
      a3 = at::vec::fmadd(wk, Vec::loadu(p + 3 * V), a3);
    }
    if (act != Activation::None) {
      a0 = activation_vec(a0, act);
      a1 = activation_vec(a1, act);
      a2 = activation_vec(a2, act);
      a3 = activation_vec(a3, act);
    }
    if (res) {
      a0 = a0 + Vec::loadu(res + i);
      a1 = a1 + Vec::loadu(res + i + V);
      a2 = a2 + Vec::loadu(res + i + 2 * V);
      a3 = a3 + Vec::loadu(res + i + 3 * V);
    }
    store_vec(dst + i, a0, stream);
    store_vec(dst + i + V, a1, stream);
    store_vec(dst + i + 2 * V, a2, stream);
    store_vec(dst + i + 3 * V, a3, stream);
  }
  for (; i < n; ++i) {
    acc_t a = init;
    for (int64_t k = 0; k < kernel; ++k) a += w_in[k] * taps_in[k][i];
    dst[i] = activation_forward(a, act) + (res ? res[i] : acc_t(0));
  }
}

template <typename acc_t>
void conv_chunk_direct(acc_t* dst, acc_t init, const acc_t* const* taps, const acc_t* w, int64_t kernel, int64_t n,
                       Activation act, const acc_t* res, bool stream) {
  switch (kernel) {
    case 2: return conv_chunk_direct_k<2>(dst, init, taps, w, kernel, n, act, res, stream);
    case 3: return conv_chunk_direct_k<3>(dst, init, taps, w, kernel, n, act, res, stream);
    case 4: return conv_chunk_direct_k<4>(dst, init, taps, w, kernel, n, act, res, stream);
    case 5: return conv_chunk_direct_k<5>(dst, init, taps, w, kernel, n, act, res, stream);
    case 7: return conv_chunk_direct_k<7>(dst, init, taps, w, kernel, n, act, res, stream);
    case 9: return conv_chunk_direct_k<9>(dst, init, taps, w, kernel, n, act, res, stream);
    default: return conv_chunk_direct_k<0>(dst, init, taps, w, kernel, n, act, res, stream);
  }
}

template <typename scalar_t>
Tensor to_acc(const Tensor& t) {
  return t.to(c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value).contiguous();
}

// ------------------------------------------------------------------------------------ forward

template <typename scalar_t>
void forward_impl(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                  const c10::optional<Tensor>& residual, Tensor& out, const Geometry& g, Activation act) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor w = to_acc<scalar_t>(weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? to_acc<scalar_t>(*bias) : Tensor();
  const Tensor res = residual.has_value() && residual->defined() ? residual->contiguous() : Tensor();

  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const acc_t* bp = has_bias ? b.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();

  const int64_t K = g.kernel, d = g.dilation, L = g.length, Lout = g.out_length;
  const int64_t chunk = chunk_size(K);
  const int64_t n_chunks = (Lout + chunk - 1) / chunk;
  const int64_t tasks = g.batch * g.c_out * n_chunks;

  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const bool stream = out.nbytes() > kStreamBytes;
  parallel_task_workers(tasks, [&](TaskCursor& next) {
    TapReader<scalar_t, acc_t> reader(K, chunk, d);
    std::vector<acc_t> acc(chunk), res_buf(rp ? chunk : 0);
    for (int64_t task = next.next(); task >= 0; task = next.next()) {
      const int64_t c = task % n_chunks;
      const int64_t co = (task / n_chunks) % g.c_out;
      const int64_t bi = task / (n_chunks * g.c_out);
      const int64_t t0 = c * chunk;
      const int64_t n = std::min(chunk, Lout - t0);
      const int64_t out_off = (bi * g.c_out + co) * Lout + t0;
      if constexpr (same) {
        if (g.c_in_per_group == 1) {
          // One input channel: everything happens in registers and the output is written once.
          const scalar_t* row = xp + (bi * g.c_in + co / g.c_out_per_group) * L;
          conv_chunk_direct(op + out_off, bp ? bp[co] : acc_t(0), reader.read(row, L, t0 - g.pad_left, n, K, d),
                            wp + co * K, K, n, act, rp ? rp + out_off : nullptr, stream);
          continue;
        }
      }
      std::fill(acc.begin(), acc.begin() + n, bp ? bp[co] : acc_t(0));
      const int64_t grp = co / g.c_out_per_group;
      for (int64_t ci = 0; ci < g.c_in_per_group; ++ci) {
        const scalar_t* row = xp + (bi * g.c_in + grp * g.c_in_per_group + ci) * L;
        const acc_t* const* taps = reader.read(row, L, t0 - g.pad_left, n, K, d);
        add_taps(acc.data(), taps, wp + (co * g.c_in_per_group + ci) * K, K, n);
      }
      const acc_t* r = nullptr;
      if (rp) {
        convert_n(rp + out_off, res_buf.data(), n);
        r = res_buf.data();
      }
      apply_epilogue(acc.data(), r, n, act);
      convert_n(acc.data(), op + out_off, n);
    }
    if (stream) stream_fence();
  });
}

Tensor forward_cpu(const Tensor& x_, const Tensor& weight_, const c10::optional<Tensor>& bias,
                   const c10::optional<Tensor>& residual, int64_t dilation, int64_t pad_left, int64_t out_length,
                   int64_t groups, c10::string_view activation) {
  const Geometry g = check_forward(x_, weight_, bias, residual, dilation, pad_left, out_length, groups);
  const Activation act = parse_activation(std::string(activation), kOp);
  const Tensor x = x_.contiguous();
  const Tensor weight = weight_.contiguous();
  Tensor out = empty_for_streaming({g.batch, g.c_out, g.out_length}, x.options());
  if (out.numel() == 0) return out;
  if (cpu::gemm_path_applies(g, x.scalar_type())) {
    cpu::forward_gemm(x, weight, bias, residual, out, g, act);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dilated_conv1d_cpu", [&] {
    forward_impl<scalar_t>(x, weight, bias, residual, out, g, act);
  });
  return out;
}

// ------------------------------------------------------------------------------------ backward

// Depthwise (groups == C_in == C_out): one task per (channel, slice of the batch).
template <typename scalar_t>
void backward_depthwise(const Tensor& grad, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                        const Geometry& g, Activation act, Tensor& grad_x, Tensor& grad_w_partial,
                        Tensor& grad_b_partial, int64_t n_split, bool need_x, bool need_w, bool need_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor w = to_acc<scalar_t>(weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? to_acc<scalar_t>(*bias) : Tensor();
  const int64_t C = g.c_out, K = g.kernel, d = g.dilation, L = g.length, Lout = g.out_length, B = g.batch;
  const int64_t span = (K - 1) * d;
  const int64_t chunk = chunk_size(K);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const acc_t* bp = has_bias ? b.const_data_ptr<acc_t>() : nullptr;
  scalar_t* dxp = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* dwp = grad_w_partial.mutable_data_ptr<acc_t>();  // (n_split, C, K)
  acc_t* dbp = grad_b_partial.mutable_data_ptr<acc_t>();  // (n_split, C)
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const bool stream = need_x && grad_x.nbytes() > kStreamBytes;

  parallel_task_workers(C * n_split, [&](TaskCursor& next) {
    TapReader<scalar_t, acc_t> x_reader(K, chunk, d);
    TapReader<acc_t, acc_t> dz_reader(K, chunk, d);
    std::vector<acc_t> dz_buf(Lout), x_buf(same ? 0 : L), out_buf(chunk), w_flip(K);
    for (int64_t task = next.next(); task >= 0; task = next.next()) {
      const int64_t c = task % C;
      const int64_t s = task / C;
      const int64_t b_lo = B * s / n_split, b_hi = B * (s + 1) / n_split;
      const acc_t* wc = wp + c * K;
      for (int64_t k = 0; k < K; ++k) w_flip[k] = wc[K - 1 - k];
      std::vector<acc_t> dw(K, acc_t(0));
      acc_t db = 0;
      for (int64_t bi = b_lo; bi < b_hi; ++bi) {
        const scalar_t* grow = gp + (bi * C + c) * Lout;
        const scalar_t* xrow = xp + (bi * C + c) * L;
        // dz for the whole row, chunk by chunk (recomputing the pre-activation when needed).
        const acc_t* dz;
        if (act == Activation::None && same) {
          dz = reinterpret_cast<const acc_t*>(grow);
        } else {
          for (int64_t t0 = 0; t0 < Lout; t0 += chunk) {
            const int64_t n = std::min(chunk, Lout - t0);
            acc_t* z = dz_buf.data() + t0;
            if (act != Activation::None) {
              std::fill(z, z + n, bp ? bp[c] : acc_t(0));
              add_taps(z, x_reader.read(xrow, L, t0 - g.pad_left, n, K, d), wc, K, n);
              convert_n(grow + t0, out_buf.data(), n);
              // out_buf holds grad; dz = grad * act'(z), written over z
              apply_activation_grad(out_buf.data(), z, n, act);
              std::memcpy(z, out_buf.data(), n * sizeof(acc_t));
            } else {
              convert_n(grow + t0, z, n);
            }
          }
          dz = dz_buf.data();
        }
        if (need_b) db += sum(dz, Lout);
        if (need_w) {
          const acc_t* xa;
          if constexpr (same) {
            xa = reinterpret_cast<const acc_t*>(xrow);
          } else {
            convert_n(xrow, x_buf.data(), L);
            xa = x_buf.data();
          }
          for (int64_t k = 0; k < K; ++k) {
            // dz[t] pairs with x[t + k*d - pad_left]; keep t where that index is inside [0, L)
            const int64_t shift = k * d - g.pad_left;
            const int64_t lo = std::clamp<int64_t>(-shift, 0, Lout);
            const int64_t hi = std::clamp<int64_t>(L - shift, lo, Lout);
            if (hi > lo) dw[k] += dot(dz + lo, xa + lo + shift, hi - lo);
          }
        }
        if (need_x) {
          // dx[s] = sum_k w[K-1-k] * dz[s - (span - pad_left) + k*d]
          scalar_t* dxrow = dxp + (bi * C + c) * L;
          for (int64_t s0 = 0; s0 < L; s0 += chunk) {
            const int64_t n = std::min(chunk, L - s0);
            const acc_t* const* taps = dz_reader.read(dz, Lout, s0 - (span - g.pad_left), n, K, d);
            if constexpr (same) {
              conv_chunk_direct(reinterpret_cast<acc_t*>(dxrow + s0), acc_t(0), taps, w_flip.data(), K, n,
                                Activation::None, static_cast<const acc_t*>(nullptr), stream);
            } else {
              conv_chunk_direct(out_buf.data(), acc_t(0), taps, w_flip.data(), K, n, Activation::None, static_cast<const acc_t*>(nullptr), false);
              convert_n(out_buf.data(), dxrow + s0, n);
            }
          }
        }
      }
      for (int64_t k = 0; k < K; ++k) dwp[(s * C + c) * K + k] = dw[k];
      dbp[s * C + c] = db;
    }
    if (stream) stream_fence();
  });
}

template <typename scalar_t>
void weight_grad_grouped(const Tensor& dz, const Tensor& x, const Geometry& g, Tensor& grad_w_partial,
                         Tensor& grad_b_partial, int64_t n_split) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel, d = g.dilation, L = g.length, Lout = g.out_length;
  const int64_t chunk = chunk_size(K);
  const int64_t n_chunks = (Lout + chunk - 1) / chunk;
  const int64_t units = g.batch * n_chunks;  // (batch, chunk) pairs, split into n_split slices
  const int64_t taps_per_co = g.c_in_per_group * K;
  const scalar_t* dzp = dz.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* dwp = grad_w_partial.mutable_data_ptr<acc_t>();  // (n_split, C_out, C_in_g, K)
  acc_t* dbp = grad_b_partial.mutable_data_ptr<acc_t>();  // (n_split, C_out)

  parallel_task_workers(g.c_out * n_split, [&](TaskCursor& next) {
    TapReader<scalar_t, acc_t> reader(K, chunk, d);
    std::vector<acc_t> dz_buf(chunk);
    for (int64_t task = next.next(); task >= 0; task = next.next()) {
      const int64_t co = task % g.c_out;
      const int64_t s = task / g.c_out;
      const int64_t grp = co / g.c_out_per_group;
      acc_t* dw = dwp + (s * g.c_out + co) * taps_per_co;
      std::fill(dw, dw + taps_per_co, acc_t(0));
      acc_t db = 0;
      for (int64_t u = units * s / n_split; u < units * (s + 1) / n_split; ++u) {
        const int64_t bi = u / n_chunks;
        const int64_t t0 = (u % n_chunks) * chunk;
        const int64_t n = std::min(chunk, Lout - t0);
        convert_n(dzp + (bi * g.c_out + co) * Lout + t0, dz_buf.data(), n);
        db += sum(dz_buf.data(), n);
        for (int64_t ci = 0; ci < g.c_in_per_group; ++ci) {
          const scalar_t* row = xp + (bi * g.c_in + grp * g.c_in_per_group + ci) * L;
          const acc_t* const* taps = reader.read(row, L, t0 - g.pad_left, n, K, d);
          for (int64_t k = 0; k < K; ++k) dw[ci * K + k] += dot(dz_buf.data(), taps[k], n);
        }
      }
      dbp[s * g.c_out + co] = db;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_, const Tensor& x_, const Tensor& weight_,
                                                const c10::optional<Tensor>& bias, int64_t dilation, int64_t pad_left,
                                                int64_t groups, c10::string_view activation,
                                                std::array<bool, 3> output_mask) {
  const Geometry g = check_backward(grad_, x_, weight_, bias, dilation, pad_left, groups);
  const Activation act = parse_activation(std::string(activation), kOp);
  const Tensor grad = grad_.contiguous();
  const Tensor x = x_.contiguous();
  const Tensor weight = weight_.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && has_bias;
  // unrequested gradients are distinct empty tensors (outputs of an op must not alias)
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const auto acc_type = at::toOpMathType(x.scalar_type());

  // with no output to propagate from, grad_x is zero; otherwise each path below writes all of it
  Tensor grad_x = need_x && grad.numel() == 0 ? at::zeros_like(x) : empty();
  Tensor grad_w = need_w ? at::zeros_like(weight) : empty();
  Tensor grad_b = need_b ? at::zeros({g.c_out}, x.options()) : empty();
  if (!(need_x || need_w || need_b) || grad.numel() == 0) return {grad_x, grad_w, grad_b};

  const bool depthwise = g.c_in_per_group == 1 && g.c_out_per_group == 1;
  if (depthwise) {
    if (need_x) grad_x = empty_for_streaming(x.sizes(), x.options());
    const int64_t n_split = split_count(g.c_out, g.batch, 4);
    Tensor dw_part = at::empty({n_split, g.c_out, g.kernel}, x.options().dtype(acc_type));
    Tensor db_part = at::empty({n_split, g.c_out}, x.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dilated_conv1d_backward_cpu", [&] {
      backward_depthwise<scalar_t>(grad, x, weight, bias, g, act, grad_x, dw_part, db_part, n_split, need_x, need_w,
                                   need_b);
    });
    if (need_w) grad_w.copy_(dw_part.sum(0).view_as(weight));
    if (need_b) grad_b.copy_(db_part.sum(0));
    return {grad_x, grad_w, grad_b};
  }

  // General groups: dz first (recomputing the pre-activation), then dx and dweight from it.
  Tensor dz = grad;
  if (act != Activation::None) {
    const Tensor z = forward_cpu(x, weight, bias, c10::nullopt, dilation, pad_left, g.out_length, groups, "none");
    dz = at::empty_like(grad);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dilated_conv1d_act_grad_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      scalar_t* dp = dz.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, grad.numel(), 16384, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> gb(end - begin), zb(end - begin);
        convert_n(gp + begin, gb.data(), end - begin);
        convert_n(zp + begin, zb.data(), end - begin);
        apply_activation_grad(gb.data(), zb.data(), end - begin, act);
        convert_n(gb.data(), dp + begin, end - begin);
      });
    });
  }
  if (need_x) {
    const Tensor w_t = transposed_weight(weight, groups);
    const int64_t span = (g.kernel - 1) * dilation;
    grad_x = forward_cpu(dz, w_t, c10::nullopt, c10::nullopt, dilation, span - pad_left, g.length, groups, "none");
  }
  if ((need_w || need_b) && cpu::gemm_path_applies(g, x.scalar_type())) {
    Tensor gw = need_w ? grad_w : Tensor(), gb = need_b ? grad_b : Tensor();
    cpu::weight_grad_gemm(dz, x, g, gw, gb);
  } else if (need_w || need_b) {
    const int64_t chunk = chunk_size(g.kernel);
    const int64_t n_split = split_count(g.c_out, g.batch * ((g.out_length + chunk - 1) / chunk), 4);
    Tensor dw_part = at::empty({n_split, g.c_out, g.c_in_per_group, g.kernel}, x.options().dtype(acc_type));
    Tensor db_part = at::empty({n_split, g.c_out}, x.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dilated_conv1d_wgrad_cpu", [&] {
      weight_grad_grouped<scalar_t>(dz, x, g, dw_part, db_part, n_split);
    });
    if (need_w) grad_w.copy_(dw_part.sum(0));
    if (need_b) grad_b.copy_(db_part.sum(0));
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace accel::dilated_conv1d

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("dilated_conv1d", &accel::dilated_conv1d::forward_cpu);
  m.impl("dilated_conv1d_backward", &accel::dilated_conv1d::backward_cpu);
}
