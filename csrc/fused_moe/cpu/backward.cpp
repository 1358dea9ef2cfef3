// Fused MoE backward on the CPU: per expert, ATen GEMMs on gathered rows (see fused_moe.h for the
// maths), with one pass over the expert's rows in between for the activation derivative,
// d topk_weights and the GEMM operands; the weight gradients written once into cached buffers,
// d hidden accumulated in fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "common/parallel.h"
#include "fused_moe/cpu/fused_moe_cpu.h"

namespace accel::fused_moe::moe_cpu {
namespace {

// act(g) and act'(g) of one vector; SiLU shares its sigmoid between the two.
template <typename acc_t>
inline void act_and_grad(const Vectorized<acc_t>& g, Activation act, Vectorized<acc_t>& a, Vectorized<acc_t>& da) {
  using V = Vectorized<acc_t>;
  if (act == Activation::Silu) {
    const V one(acc_t(1));
    const V s = one / (one + cpu::exp_fast(g.neg()));
    a = g * s;
    da = s * (one + g * (one - s));
  } else {
    a = cpu::activation_vec(g, act);
    da = cpu::activation_grad_vec(g, act);
  }
}

// The backward's elementwise part for the n pairs of one expert, row r being pair pair[r] of token
// pair[r] / top_k. From the saved gate and up values and z = dout W2 (before the routing weight w):
//   h = act(g) u,  d w = z . h,  dh = w z,  dgate = dh u act'(g),  dup = dh act(g),
// rounded to T for the GEMMs that follow: dgu (n, 2I) = [dgate | dup], hs (n, I) = h and
// gw (n, H) = w dout (each output only when its pointer is set; z only when dgu or dwt is).
template <typename T>
void backward_rows(const T* cache, const int64_t* pair, int64_t top_k, int64_t n, int64_t I, int64_t H,
                   const T* z, const T* grad_out, const at::opmath_type<T>* wflat, Activation act, T* dgu, T* hs,
                   T* gw, at::opmath_type<T>* dwt) {
  using acc_t = at::opmath_type<T>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  cpu::parallel_task_workers(n, [&](cpu::TaskCursor& next) {
    std::vector<acc_t> buf(4 * I + H);
    acc_t *g = buf.data(), *u = g + I, *zf = u + I, *hf = zf + I, *gof = hf + I;
    for (int64_t r = next.next(); r >= 0; r = next.next()) {
      const int64_t p = pair[r];
      const acc_t w = wflat[p];
      cpu::convert_n(cache + p * 2 * I, g, I);
      cpu::convert_n(cache + p * 2 * I + I, u, I);
      if (z) cpu::convert_n(z + r * I, zf, I);
      const V wv(w);
      V dsum(acc_t(0));
      int64_t i = 0;
      for (; i + W <= I; i += W) {
        const V gv = V::loadu(g + i), uv = V::loadu(u + i);
        V a, da;
        act_and_grad<acc_t>(gv, act, a, da);
        const V h = a * uv;
        h.store(hf + i);
        if (z) {
          const V zv = V::loadu(zf + i);
          dsum = at::vec::fmadd(zv, h, dsum);
          const V dh = wv * zv;
          (dh * uv * da).store(g + i);  // dgate over g, dup over u: both were read above
          (dh * a).store(u + i);
        }
      }
      acc_t dot = at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return x + y; }, dsum);
      for (; i < I; ++i) {
        const acc_t a = activation_forward<acc_t>(g[i], act), da = activation_grad<acc_t>(g[i], act);
        const acc_t h = a * u[i];
        hf[i] = h;
        if (z) {
          dot += zf[i] * h;
          const acc_t dh = w * zf[i];
          g[i] = dh * u[i] * da;
          u[i] = dh * a;
        }
      }
      if (dwt) dwt[p] = dot;
      if (dgu) {
        cpu::convert_n(g, dgu + r * 2 * I, I);
        cpu::convert_n(u, dgu + r * 2 * I + I, I);
      }
      if (hs) cpu::convert_n(hf, hs + r * I, I);
      if (gw) {
        cpu::convert_n(grad_out + (p / top_k) * H, gof, H);
        scale_n<acc_t>(gof, w, gof, H);
        cpu::convert_n(gof, gw + r * H, H);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& hidden_, const at::Tensor& w1_, const at::Tensor& w2_,
    const at::Tensor& weights_, const at::Tensor& ids, const at::Tensor& cache_, c10::string_view activation,
    std::array<bool, 4> mask) {
  const Geometry g = check_backward(grad_out_, hidden_, w1_, w2_, weights_, ids, cache_);
  const Activation act = parse_activation(std::string(activation), kOp);
  const Routing r = make_routing(ids, g.experts);
  const at::Tensor grad_out = grad_out_.contiguous(), hidden = hidden_.contiguous();
  const at::Tensor w1 = w1_.contiguous(), w2 = w2_.contiguous(), weights = weights_.contiguous();
  const at::Tensor cache = cache_.contiguous();
  const int64_t H = g.hidden, I = g.inter, E = g.experts;
  const auto opts = hidden.options();
  const at::ScalarType acc_type = at::toOpMathType(hidden.scalar_type());

  // The weight gradients are written once, expert by expert (a GEMM straight into a routed
  // expert's slice, zeros into the others), into buffers from accel's CPU block cache: a fresh
  // 100+ MB tensor would fault its pages in on every call, which cost more than the GEMMs of a
  // decode-sized backward.
  at::Tensor dx_acc = mask[0] ? at::zeros({g.tokens, H}, opts.dtype(acc_type)) : at::Tensor();
  at::Tensor dw1 = mask[1] ? empty_for_streaming(w1.sizes(), opts) : at::empty({0}, opts);
  at::Tensor dw2 = mask[2] ? empty_for_streaming(w2.sizes(), opts) : at::empty({0}, opts);
  at::Tensor dwt_acc = mask[3] ? at::zeros({r.pairs}, opts.dtype(acc_type)) : at::Tensor();
  const at::Tensor wflat = weights.reshape({-1}).to(acc_type);  // weights is contiguous, so is wflat
  const bool need_dgu = mask[0] || mask[1], need_z = need_dgu || mask[3];

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "fused_moe_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = r.offsets[e], n = r.offsets[e + 1] - s0;
      if (n == 0) {
        if (mask[1]) dw1[e].zero_();
        if (mask[2]) dw2[e].zero_();
        continue;
      }
      std::vector<int64_t> pair(r.order.begin() + s0, r.order.begin() + s0 + n), tok(n);
      for (int64_t i = 0; i < n; ++i) tok[i] = pair[i] / r.top_k;
      const at::Tensor tidx = at::from_blob(tok.data(), {n}, at::kLong);  // tok outlives the iteration
      const at::Tensor z = need_z ? at::mm(grad_out.index_select(0, tidx), w2[e]) : at::Tensor();  // (n, I)
      const at::Tensor dgu = need_dgu ? at::empty({n, 2 * I}, opts) : at::Tensor();
      const at::Tensor hs = mask[2] ? at::empty({n, I}, opts) : at::Tensor();
      const at::Tensor gw = mask[2] ? at::empty({n, H}, opts) : at::Tensor();
      backward_rows<scalar_t>(cache.const_data_ptr<scalar_t>(), pair.data(), r.top_k, n, I, H,
                              need_z ? z.const_data_ptr<scalar_t>() : nullptr, grad_out.const_data_ptr<scalar_t>(),
                              wflat.const_data_ptr<acc_t>(), act,
                              need_dgu ? dgu.mutable_data_ptr<scalar_t>() : nullptr,
                              mask[2] ? hs.mutable_data_ptr<scalar_t>() : nullptr,
                              mask[2] ? gw.mutable_data_ptr<scalar_t>() : nullptr,
                              mask[3] ? dwt_acc.mutable_data_ptr<acc_t>() : nullptr);
      if (mask[2]) {
        at::Tensor dst = dw2[e];
        at::mm_out(dst, gw.t(), hs);
      }
      if (mask[1]) {
        at::Tensor dst = dw1[e];
        at::mm_out(dst, dgu.t(), hidden.index_select(0, tidx));
      }
      if (mask[0]) dx_acc.index_add_(0, tidx, at::mm(dgu, w1[e]).to(acc_type));
    }
  });
  at::Tensor dx = mask[0] ? dx_acc.to(hidden.scalar_type()) : at::empty({0}, opts);
  at::Tensor dwt = mask[3] ? dwt_acc.view(weights.sizes()).to(weights.scalar_type())
                           : at::empty({0}, weights.options());
  return {dx, dw1, dw2, dwt};
}

}  // namespace
}  // namespace accel::fused_moe::moe_cpu

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("fused_moe_bwd", &accel::fused_moe::moe_cpu::fused_moe_bwd_cpu);
}
