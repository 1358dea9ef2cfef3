// The fused-MoE grouped GEMM (csrc/fused_moe/cuda/fused_moe_gemm.cuh) runs on the CPU through
// the emulator in cuda_emu.h, in every mode (gate/up and down forward, the two backward row GEMMs,
// the weight gradients) for fp16 and bf16 (tensor cores) and fp32, against a float64 host
// reference. The expert sort is rebuilt here in plain host code; rows that hold no pair (the
// padding of every expert's segment) are filled with NaN in every input the kernel must skip, and
// every output starts as NaN where the kernel must write. Each case runs with the warps in order
// and in reverse, one warp at a time up to each barrier, so a missing __syncthreads shows up.
//
// Build: the top-level CMakeLists.txt (needs the CUDA and torch headers, links c10).
// Run:   test_fused_moe_cuda_emu [filter]   (exit 1 on any failure)
#define ACCEL_CUDA_EMU_RUNTIME
#include "fused_moe/cuda/fused_moe_gemm.cuh"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace moe = accel::fused_moe::cuda;
namespace emu = accel::cuda_emu;
using moe::GemmMode;
using moe::GemmParams;
using moe::Gather;
using moe::kBlockM;

namespace {

template <typename T>
T to_t(double x) {
  if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else {
    return __float2bfloat16_rn(static_cast<float>(x));
  }
}
inline double to_d(float x) { return x; }
inline double to_d(__half x) { return __half2float(x); }
inline double to_d(__nv_bfloat16 x) { return __bfloat162float(x); }

struct Case {
  std::string name;
  int tokens, experts, top_k, hidden, inter;
  accel::Activation act;
  bool weights_float = true;  // topk_weights float32, else the hidden dtype
  std::vector<int> skip;      // experts no pair is routed to
};

// The sorted pair rows (what the sort kernels build on the GPU): stable in pair order, every
// expert's segment padded to a multiple of kBlockM; ids outside [0, E) are dropped.
struct Sorted {
  std::vector<int> sorted, block_expert, offsets;
  int n_blocks = 0;
  int rows() const { return n_blocks * kBlockM; }
};

Sorted sort_pairs(const std::vector<int>& ids, int experts) {
  const int pairs = static_cast<int>(ids.size());
  Sorted s;
  s.n_blocks = moe::ceil_div(pairs + experts * (kBlockM - 1), kBlockM);
  s.sorted.assign(s.rows(), -1);
  s.block_expert.assign(s.n_blocks, -1);
  s.offsets.assign(experts + 1, 0);
  std::vector<int> count(experts, 0);
  for (int e : ids) {
    if (e >= 0 && e < experts) ++count[e];
  }
  for (int e = 0; e < experts; ++e) s.offsets[e + 1] = s.offsets[e] + moe::ceil_div(count[e], kBlockM) * kBlockM;
  std::vector<int> next(s.offsets.begin(), s.offsets.end() - 1);
  for (int p = 0; p < pairs; ++p) {
    if (ids[p] >= 0 && ids[p] < experts) s.sorted[next[ids[p]]++] = p;
  }
  for (int e = 0; e < experts; ++e) {
    for (int r = s.offsets[e]; r < s.offsets[e + 1]; r += kBlockM) s.block_expert[r / kBlockM] = e;
  }
  return s;
}

struct Check {
  std::string detail;
  // max |got - want| over max |want|, NaN or inf in `got` fails
  void add(const char* what, const std::vector<double>& got, const std::vector<double>& want, double tol) {
    double err = 0, ref = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      if (!std::isfinite(got[i])) {
        err = INFINITY;
        break;
      }
      err = std::max(err, std::fabs(got[i] - want[i]));
      ref = std::max(ref, std::fabs(want[i]));
    }
    const double rel = err / std::max(ref, 1e-30);
    if (!(rel <= tol)) {
      char buf[160];
      std::snprintf(buf, sizeof buf, " %s: max|err|/max|ref| = %.3g (tol %.1g)", what, rel, tol);
      detail += buf;
    }
  }
};

template <typename T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, __half> ? 2e-3 : 1e-2;
}

template <typename T>
std::string run_case(const Case& c, emu::Order order, uint64_t seed) {
  emu::set_order(order, seed);
  std::mt19937 rng(static_cast<uint32_t>(seed * 7919 + c.hidden * 31 + c.inter));
  std::normal_distribution<float> normal(0.f, 1.f);
  const int T_ = c.tokens, E = c.experts, K = c.top_k, H = c.hidden, I = c.inter, P = T_ * K;
  const double nan = std::nan("");
  const double tol = tolerance<T>(), tol_f32 = 1e-5;

  // routing: distinct experts per token, none of `skip`, and one dropped pair (id E)
  std::vector<int> allowed;
  for (int e = 0; e < E; ++e) {
    if (std::find(c.skip.begin(), c.skip.end(), e) == c.skip.end()) allowed.push_back(e);
  }
  std::vector<int> ids(P);
  for (int t = 0; t < T_; ++t) {
    std::vector<int> pool = allowed;
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int j = 0; j < K; ++j) ids[t * K + j] = pool[j % pool.size()];
  }
  if (P > 3) ids[3] = E;
  const Sorted s = sort_pairs(ids, E);
  const int rows = s.rows();
  auto pair_of = [&](int row) { return s.sorted[row]; };
  auto used_row = [&](int row) { return s.block_expert[row / kBlockM] >= 0; };

  auto randn = [&](size_t n, double scale) {
    std::vector<T> v(n);
    for (T& x : v) x = to_t<T>(scale * normal(rng));
    return v;
  };
  // per sorted row: random where a pair lives, NaN on padding rows (the kernel must skip them)
  auto rows_input = [&](int width, double scale) {
    std::vector<T> v = randn(static_cast<size_t>(rows) * width, scale);
    for (int r = 0; r < rows; ++r) {
      if (pair_of(r) < 0) {
        for (int i = 0; i < width; ++i) v[static_cast<size_t>(r) * width + i] = to_t<T>(nan);
      }
    }
    return v;
  };
  const std::vector<T> x = randn(static_cast<size_t>(T_) * H, 1.0);
  const std::vector<T> dout = randn(static_cast<size_t>(T_) * H, 1.0);
  const std::vector<T> w1 = randn(static_cast<size_t>(E) * 2 * I * H, 1.0 / std::sqrt(H));
  const std::vector<T> w2 = randn(static_cast<size_t>(E) * H * I, 1.0 / std::sqrt(I));
  const std::vector<T> cache = randn(static_cast<size_t>(P) * 2 * I, 1.0);
  const std::vector<T> hbuf = rows_input(I, 1.0);
  const std::vector<T> dgu = rows_input(2 * I, 1.0);
  const std::vector<T> hw = rows_input(I, 1.0);
  std::vector<float> tw_f(P);
  for (float& w : tw_f) w = std::uniform_real_distribution<float>(0.1f, 1.f)(rng);
  std::vector<T> tw_t(P);
  for (int p = 0; p < P; ++p) {
    tw_t[p] = to_t<T>(tw_f[p]);
    tw_f[p] = static_cast<float>(to_d(tw_t[p]));  // the same weight either way
  }
  auto xd = [&](const std::vector<T>& v, size_t i) { return to_d(v[i]); };
  auto token = [&](int row) { return pair_of(row) / K; };
  auto expert = [&](int row) { return ids[pair_of(row)]; };

  auto base = [&]() {
    GemmParams p;
    p.top_k = K;
    p.inter = I;
    p.n_blocks = s.n_blocks;
    p.experts = E;
    p.sorted_pairs = s.sorted.data();
    p.block_expert = s.block_expert.data();
    p.expert_offsets = s.offsets.data();
    p.act = c.act;
    p.weights = c.weights_float ? static_cast<const void*>(tw_f.data()) : static_cast<const void*>(tw_t.data());
    p.weights_float = c.weights_float;
    return p;
  };
  auto operand = [](const void* ptr, int64_t ld, int64_t expert_stride, Gather g) {
    moe::Operand o;
    o.ptr = ptr;
    o.ld = ld;
    o.expert_stride = expert_stride;
    o.gather = g;
    const int64_t vec = 16 / static_cast<int64_t>(sizeof(T));
    o.vec = reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % vec == 0 && expert_stride % vec == 0;
    return o;
  };
  Check check;
  auto launch = [&](GemmMode m, const GemmParams& p) {
    cudaError_t e = cudaErrorInvalidValue;
    switch (m) {
      case GemmMode::UpFwd: e = moe::gemm::launch<T, GemmMode::UpFwd>(p, nullptr); break;
      case GemmMode::DownFwd: e = moe::gemm::launch<T, GemmMode::DownFwd>(p, nullptr); break;
      case GemmMode::ZBwd: e = moe::gemm::launch<T, GemmMode::ZBwd>(p, nullptr); break;
      case GemmMode::DxBwd: e = moe::gemm::launch<T, GemmMode::DxBwd>(p, nullptr); break;
      case GemmMode::WGrad: e = moe::gemm::launch<T, GemmMode::WGrad>(p, nullptr); break;
    }
    if (e != cudaSuccess) check.detail += " launch failed";
  };
  // dot of row `a` (stride sa) and row `b` (stride sb) over n elements
  auto dot = [&](const std::vector<T>& va, size_t a, size_t sa, const std::vector<T>& vb, size_t b, size_t sb, int n) {
    double acc = 0;
    for (int i = 0; i < n; ++i) acc += xd(va, a + i * sa) * xd(vb, b + i * sb);
    return acc;
  };

  // ---- UpFwd: hbuf = act(x W1g^T) (x W1u^T) per pair row (0 on padding rows), g|u -> cache
  {
    std::vector<T> h_out(static_cast<size_t>(rows) * I, to_t<T>(nan));
    std::vector<T> c_out(static_cast<size_t>(P) * 2 * I, to_t<T>(nan));
    GemmParams p = base();
    p.M = rows, p.N = I, p.K = H;
    p.a = operand(x.data(), H, 0, Gather::Token);
    p.b = operand(w1.data(), H, int64_t(2) * I * H, Gather::Direct);
    p.out = h_out.data();
    p.out2 = c_out.data();
    launch(GemmMode::UpFwd, p);
    std::vector<double> got, want, got_c, want_c;
    for (int r = 0; r < rows; ++r) {
      if (!used_row(r)) continue;
      for (int n = 0; n < I; ++n) {
        double h = 0;
        if (pair_of(r) >= 0) {
          const size_t w = static_cast<size_t>(expert(r)) * 2 * I * H;
          const double g = dot(x, size_t(token(r)) * H, 1, w1, w + size_t(n) * H, 1, H);
          const double u = dot(x, size_t(token(r)) * H, 1, w1, w + size_t(I + n) * H, 1, H);
          h = accel::activation_forward(g, c.act) * u;
          const size_t cp = size_t(pair_of(r)) * 2 * I;
          got_c.push_back(to_d(c_out[cp + n]));
          want_c.push_back(g);
          got_c.push_back(to_d(c_out[cp + I + n]));
          want_c.push_back(u);
        }
        got.push_back(to_d(h_out[size_t(r) * I + n]));
        want.push_back(h);
      }
    }
    check.add("up hbuf", got, want, tol);
    check.add("up cache", got_c, want_c, tol);
  }

  // ---- DownFwd: y[pair] = w hbuf[row] W2[e]^T (float)
  {
    std::vector<float> y(static_cast<size_t>(P) * H, NAN);
    GemmParams p = base();
    p.M = rows, p.N = H, p.K = I;
    p.a = operand(hbuf.data(), I, 0, Gather::Row);
    p.b = operand(w2.data(), I, int64_t(H) * I, Gather::Direct);
    p.out = y.data();
    launch(GemmMode::DownFwd, p);
    std::vector<double> got, want;
    for (int r = 0; r < rows; ++r) {
      if (pair_of(r) < 0) continue;
      for (int n = 0; n < H; ++n) {
        const double v = dot(hbuf, size_t(r) * I, 1, w2, size_t(expert(r)) * H * I + size_t(n) * I, 1, I);
        got.push_back(y[size_t(pair_of(r)) * H + n]);
        want.push_back(tw_f[pair_of(r)] * v);
      }
    }
    check.add("down y", got, want, tol_f32);
  }

  // ---- ZBwd: z = dout[tok] W2[e]; dg|du per row; dw partial sums of z act(g) u per I tile
  {
    const int tiles = moe::ceil_div(I, moe::kBlockN);
    std::vector<T> d_out(static_cast<size_t>(rows) * 2 * I, to_t<T>(nan));
    std::vector<float> part(static_cast<size_t>(rows) * tiles, NAN);
    GemmParams p = base();
    p.M = rows, p.N = I, p.K = H;
    p.a = operand(dout.data(), H, 0, Gather::Token);
    p.b = operand(w2.data(), I, int64_t(H) * I, Gather::Direct);
    p.out = d_out.data();
    p.cache = cache.data();
    p.dw_part = part.data();
    launch(GemmMode::ZBwd, p);
    std::vector<double> got, want, got_p, want_p;
    for (int r = 0; r < rows; ++r) {
      if (!used_row(r)) continue;
      std::vector<double> sums(tiles, 0.0);
      for (int n = 0; n < I; ++n) {
        double dg = 0, du = 0;
        if (pair_of(r) >= 0) {
          const double z = dot(dout, size_t(token(r)) * H, 1, w2, size_t(expert(r)) * H * I + n, I, H);
          const size_t cp = size_t(pair_of(r)) * 2 * I;
          const double g = xd(cache, cp + n), u = xd(cache, cp + I + n);
          const double a = accel::activation_forward(g, c.act), dh = tw_f[pair_of(r)] * z;
          dg = dh * u * accel::activation_grad(g, c.act);
          du = dh * a;
          sums[n / moe::kBlockN] += z * a * u;
        }
        got.push_back(to_d(d_out[size_t(r) * 2 * I + n]));
        want.push_back(dg);
        got.push_back(to_d(d_out[size_t(r) * 2 * I + I + n]));
        want.push_back(du);
      }
      for (int j = 0; j < tiles; ++j) {
        got_p.push_back(part[size_t(r) * tiles + j]);
        want_p.push_back(sums[j]);
      }
    }
    check.add("z dgu", got, want, tol);
    check.add("z dw_part", got_p, want_p, tol_f32 * 10);
  }

  // ---- DxBwd: y[pair] = dgu[row] W1[e] (float)
  {
    std::vector<float> y(static_cast<size_t>(P) * H, NAN);
    GemmParams p = base();
    p.M = rows, p.N = H, p.K = 2 * I;
    p.a = operand(dgu.data(), 2 * I, 0, Gather::Row);
    p.b = operand(w1.data(), H, int64_t(2) * I * H, Gather::Direct);
    p.out = y.data();
    launch(GemmMode::DxBwd, p);
    std::vector<double> got, want;
    for (int r = 0; r < rows; ++r) {
      if (pair_of(r) < 0) continue;
      for (int n = 0; n < H; ++n) {
        got.push_back(y[size_t(pair_of(r)) * H + n]);
        want.push_back(dot(dgu, size_t(r) * 2 * I, 1, w1, size_t(expert(r)) * 2 * I * H + n, H, 2 * I));
      }
    }
    check.add("dx y", got, want, tol_f32);
  }

  // ---- WGrad: dW2[e] = sum over e's rows dout[tok]^T hw[row]; dW1[e] = sum dgu[row]^T x[tok]
  auto wgrad = [&](const char* what, int M, int N, const std::vector<T>& a, int lda, Gather ga,
                   const std::vector<T>& b, int ldb, Gather gb) {
    std::vector<T> dw(static_cast<size_t>(E) * M * N, to_t<T>(nan));
    GemmParams p = base();
    p.M = M, p.N = N;
    p.a = operand(a.data(), lda, 0, ga);
    p.b = operand(b.data(), ldb, 0, gb);
    p.out = dw.data();
    launch(GemmMode::WGrad, p);
    std::vector<double> want(dw.size(), 0.0), got(dw.size());
    for (int r = 0; r < rows; ++r) {
      if (pair_of(r) < 0) continue;
      const size_t ra = size_t(ga == Gather::Token ? token(r) : r) * lda;
      const size_t rb = size_t(gb == Gather::Token ? token(r) : r) * ldb;
      double* w = want.data() + size_t(expert(r)) * M * N;
      for (int m = 0; m < M; ++m) {
        for (int n = 0; n < N; ++n) w[size_t(m) * N + n] += xd(a, ra + m) * xd(b, rb + n);
      }
    }
    for (size_t i = 0; i < dw.size(); ++i) got[i] = to_d(dw[i]);
    check.add(what, got, want, tol);
  };
  wgrad("dW2", H, I, dout, H, Gather::Token, hw, I, Gather::Row);
  wgrad("dW1", 2 * I, H, dgu, 2 * I, Gather::Row, x, H, Gather::Token);
  return check.detail;
}

std::vector<Case> cases() {
  using accel::Activation;
  // name, tokens, experts, top_k, hidden, inter, activation
  std::vector<Case> cs;
  cs.push_back({"bf16 aligned H64 I48 silu", 37, 4, 2, 64, 48, Activation::Silu});
  cs.push_back({"fp16 odd H37 I21 gelu, hidden-dtype weights", 29, 5, 2, 37, 21, Activation::Gelu, false, {2}});
  cs.push_back({"bf16 odd H45 I70 relu, 2 empty experts", 70, 6, 3, 45, 70, Activation::Relu, true, {0, 4}});
  cs.push_back({"fp16 aligned H72 I40 silu k1", 66, 3, 1, 72, 40, Activation::Silu, false});
  cs.push_back({"fp32 odd H23 I19 gelu", 21, 3, 2, 23, 19, Activation::Gelu, true, {1}});
  return cs;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  emu::Report report;
  const std::pair<const char*, emu::Order> orders[] = {{"warp-serial", emu::Order::warp_serial},
                                                       {"warp-serial-rev", emu::Order::warp_serial_reverse}};
  for (const Case& c : cases()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    for (int oi = 0; oi < 2; ++oi) {
      report.run(c.name, orders[oi].first, [&] {
        if (c.name.rfind("fp32", 0) == 0) return run_case<float>(c, orders[oi].second, 1 + oi);
        if (c.name.rfind("fp16", 0) == 0) return run_case<__half>(c, orders[oi].second, 1 + oi);
        return run_case<__nv_bfloat16>(c, orders[oi].second, 1 + oi);
      });
    }
  }
  return report.finish();
}
