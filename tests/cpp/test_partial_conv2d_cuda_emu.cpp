// The partial convolution's CUDA kernels (csrc/partial_conv2d/cuda/partial_conv2d_kernels.cuh) run
// on the CPU through the emulator in cuda_emu.h, for fp32, fp64, bf16 and fp16, against a float64
// host reference: the forward convolution (with and without bias), grad_x (the same kernel with the
// weights transposed and flipped) and grad_weight / grad_bias (the tiled partial sums, then their
// sum over the splits). Shapes with odd sizes, 1x1 images, images of several tiles in both
// directions, narrow and tall images, every channel group size (4, 8, 16 output channels a block;
// 1 to 16 channels a grad_weight group, one to eight row lanes), one split and several; inputs
// contiguous, channels_last and strided along W (the gaps NaN); outputs contiguous or
// channels_last, pre-filled with NaN so a missed write shows, and the channels >= Cp (the
// launcher's copy) must stay untouched. The untouched channels' reductions (untouched_sums.cuh):
// the statistics (mean, unbiased std, on inputs offset so that |mean| >> std) and the scale/shift
// gradients' sums, over one share of the pixels and several. Threads run in forward, reverse and
// warp-serial order.
//
// Build: the top-level CMakeLists.txt (needs the CUDA and torch headers, links c10).
// Run:   test_partial_conv2d_cuda_emu [filter]   (exit 1 on any failure)
#define ACCEL_CUDA_EMU_RUNTIME
#include "partial_conv2d/cuda/partial_conv2d_kernels.cuh"
#include "partial_conv2d/cuda/untouched_sums.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace pc = accel::partial_conv2d::cuda;
namespace emu = accel::cuda_emu;

namespace {

enum class Layout { contiguous, channels_last, strided_w };

const char* layout_name(Layout l) {
  return l == Layout::contiguous ? "contiguous" : l == Layout::channels_last ? "channels_last" : "strided W";
}

struct Case {
  const char* dtype;  // fp32, fp64, bf16, fp16
  int64_t batch, channels, cp, height, width;
  bool bias;
  Layout x_layout, g_layout;  // input and grad_out (the outputs: contiguous, or channels_last with the input)
  int64_t target_blocks;      // grad_weight's plan: how many blocks to aim for (sets the splits)
  std::string name() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s B%lld C%lld Cp%lld %lldx%lld%s x %s, g %s, ~%lld blk", dtype, (long long)batch,
                  (long long)channels, (long long)cp, (long long)height, (long long)width, bias ? " bias" : "",
                  layout_name(x_layout), layout_name(g_layout), (long long)target_blocks);
    return buf;
  }
};

// A (B, C, H, W) tensor in host memory with the strides of a layout.
template <typename T>
struct Tensor4 {
  int64_t B, C, H, W;
  pc::Strides s;
  std::vector<T> data;
  Tensor4(int64_t b, int64_t c, int64_t h, int64_t w, Layout layout) : B(b), C(c), H(h), W(w) {
    switch (layout) {
      case Layout::contiguous: s = {C * H * W, H * W, W, 1}; break;
      case Layout::channels_last: s = {H * W * C, 1, W * C, C}; break;
      case Layout::strided_w: s = {C * H * 2 * W, H * 2 * W, 2 * W, 2}; break;
    }
    const int64_t n = layout == Layout::strided_w ? B * C * H * 2 * W : B * C * H * W;
    data.assign(n, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
  }
  T& at(int64_t b, int64_t c, int64_t y, int64_t x) { return data[b * s.b + c * s.c + y * s.h + x * s.w]; }
  double get(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return static_cast<double>(data[b * s.b + c * s.c + y * s.h + x * s.w]);
  }
  // zero outside the image
  double pad(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return y < 0 || y >= H || x < 0 || x >= W ? 0.0 : get(b, c, y, x);
  }
};

template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, c10::Half>) return 2e-3;
  return 1e-2;
}

// "" when got matches want within tol times the sum of the absolute terms.
std::string compare(const char* what, double got, double want, double scale, double tol, int64_t a, int64_t b,
                    int64_t c, int64_t d) {
  if (std::fabs(got - want) <= tol * scale + 1e-30) return "";
  char buf[200];
  std::snprintf(buf, sizeof buf, "  %s[%lld,%lld,%lld,%lld] = %.9g, want %.9g (scale %.3g)", what, (long long)a,
                (long long)b, (long long)c, (long long)d, got, want, scale);
  return buf;
}

// The channels >= cp of an output must not be written by the kernels (the launcher copies them).
template <typename T>
std::string check_untouched(const char* what, const Tensor4<T>& t, int64_t cp) {
  for (int64_t b = 0; b < t.B; ++b)
    for (int64_t c = cp; c < t.C; ++c)
      for (int64_t y = 0; y < t.H; ++y)
        for (int64_t x = 0; x < t.W; ++x)
          if (!std::isnan(t.get(b, c, y, x))) {
            char buf[120];
            std::snprintf(buf, sizeof buf, "  %s[%lld,%lld,%lld,%lld] (an untouched channel) was written", what,
                          (long long)b, (long long)c, (long long)y, (long long)x);
            return buf;
          }
  return "";
}

// The untouched channels' sums: statistics of x + 4 (mean far from 0) and the gradient sums of
// (g, x), with the plan's shares and with cs.target_blocks forcing several.
template <typename T>
std::string untouched_sums_case(const Case& cs, const Tensor4<T>& x0, const Tensor4<T>& g) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t B = cs.batch, C = cs.channels, cp = cs.cp, H = cs.height, W = cs.width, cu = C - cp, N = H * W;
  if (cu == 0) return "";
  Tensor4<T> x = x0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) x.at(b, c, y, xx) = static_cast<T>(x0.get(b, c, y, xx) + 4.0);
  const double tol = tolerance<T>();
  for (int64_t target : {int64_t(1), cs.target_blocks * 16}) {
    pc::SumsParams sp{x.data.data(), x.s, nullptr, pc::Strides{}, B, cp, cu, N, W, pc::channel_fastest(x.s)};
    pc::SumsPlan pl = pc::plan_sums(sp, target);
    std::vector<acc_t> part(pl.shares * B * cu * 2);
    std::vector<T> mean(B * cu), sd(B * cu);
    pc::launch_sums<true, T, acc_t, T>(sp, pl, part.data(), mean.data(), sd.data(), 0);
    pc::SumsParams gp{g.data.data(), g.s, x.data.data(), x.s, B, cp, cu, N, W, pc::channel_fastest(g.s)};
    pl = pc::plan_sums(gp, target);
    part.assign(pl.shares * B * cu * 2, acc_t(0));
    std::vector<T> sgx(B * cu), sg(B * cu);
    pc::launch_sums<false, T, acc_t, T>(gp, pl, part.data(), sgx.data(), sg.data(), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < cu; ++c) {
        double s1 = 0, s2 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (int64_t y = 0; y < H; ++y)
          for (int64_t xx = 0; xx < W; ++xx) {
            const double v = x.get(b, cp + c, y, xx), gv = g.get(b, cp + c, y, xx);
            s1 += v, a1 += gv * v, a2 += gv, a3 += std::fabs(gv);
            s2 += std::fabs(gv * v);
          }
        const double m = s1 / N;
        double m2 = 0;
        for (int64_t y = 0; y < H; ++y)
          for (int64_t xx = 0; xx < W; ++xx) m2 += (x.get(b, cp + c, y, xx) - m) * (x.get(b, cp + c, y, xx) - m);
        const int64_t j = b * cu + c;
        std::string e = compare("mean", static_cast<double>(mean[j]), m, std::fabs(m), tol, b, c, target, 0);
        if (e.empty() && N > 1) {
          const double sdv = std::sqrt(m2 / (N - 1));
          // the shifted sums lose about |mean| / std digits of the variance to rounding
          e = compare("std", static_cast<double>(sd[j]), sdv, sdv + std::fabs(m) * 4, tol, b, c, target, 0);
        }
        if (e.empty() && N == 1 && !std::isnan(static_cast<double>(sd[j]))) e = "  std of one pixel is not NaN";
        if (e.empty()) e = compare("sum_gx", static_cast<double>(sgx[j]), a1, s2, tol, b, c, target, 1);
        if (e.empty()) e = compare("sum_g", static_cast<double>(sg[j]), a2, a3, tol, b, c, target, 2);
        if (!e.empty()) return e;
      }
  }
  return "";
}

template <typename T>
std::string run_case(const Case& cs, emu::Order order, uint64_t seed) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd;
  const int64_t B = cs.batch, C = cs.channels, cp = cs.cp, H = cs.height, W = cs.width;
  const Layout out_layout = cs.x_layout == Layout::channels_last ? Layout::channels_last : Layout::contiguous;
  const double tol = tolerance<T>();

  Tensor4<T> x(B, C, H, W, cs.x_layout), g(B, C, H, W, cs.g_layout);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) {
          x.at(b, c, y, xx) = static_cast<T>(nd(rng));
          g.at(b, c, y, xx) = static_cast<T>(nd(rng));
        }
  std::vector<T> w(cp * cp * 9), bias(cp);
  for (auto& e : w) e = static_cast<T>(nd(rng) / (3.0 * std::sqrt(static_cast<double>(cp))));
  for (auto& e : bias) e = static_cast<T>(nd(rng));
  auto wv = [&](int64_t co, int64_t ci, int64_t kh, int64_t kw) {
    return static_cast<double>(w[((co * cp + ci) * 3 + kh) * 3 + kw]);
  };
  emu::set_order(order, seed);

  // ---- forward
  Tensor4<T> out(B, C, H, W, out_layout);
  pc::ConvParams fp{x.data.data(), x.s, out.data.data(), out.s, w.data(), cs.bias ? bias.data() : nullptr,
                    B, H, W, cp, false, pc::channel_fastest(x.s)};
  pc::launch_conv<T, acc_t>(fp, pc::plan_conv<acc_t>(H, W, cp), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t co = 0; co < cp; ++co)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) {
          double z = cs.bias ? static_cast<double>(bias[co]) : 0.0, scale = std::fabs(z);
          for (int64_t ci = 0; ci < cp; ++ci)
            for (int64_t kh = 0; kh < 3; ++kh)
              for (int64_t kw = 0; kw < 3; ++kw) {
                const double t = wv(co, ci, kh, kw) * x.pad(b, ci, y + kh - 1, xx + kw - 1);
                z += t;
                scale += std::fabs(t);
              }
          const std::string e = compare("out", out.get(b, co, y, xx), z, scale, tol, b, co, y, xx);
          if (!e.empty()) return e;
        }
  if (std::string e = check_untouched("out", out, cp); !e.empty()) return e;

  // ---- grad_x: grad_out convolved with the weights transposed and flipped
  Tensor4<T> gx(B, C, H, W, out_layout);
  pc::ConvParams bp{g.data.data(), g.s, gx.data.data(), gx.s, w.data(), nullptr, B, H, W, cp, true,
                    pc::channel_fastest(g.s)};
  pc::launch_conv<T, acc_t>(bp, pc::plan_conv<acc_t>(H, W, cp), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ci = 0; ci < cp; ++ci)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) {
          double z = 0, scale = 0;
          for (int64_t co = 0; co < cp; ++co)
            for (int64_t kh = 0; kh < 3; ++kh)
              for (int64_t kw = 0; kw < 3; ++kw) {
                const double t = wv(co, ci, kh, kw) * g.pad(b, co, y - kh + 1, xx - kw + 1);
                z += t;
                scale += std::fabs(t);
              }
          const std::string e = compare("grad_x", gx.get(b, ci, y, xx), z, scale, tol, b, ci, y, xx);
          if (!e.empty()) return e;
        }
  if (std::string e = check_untouched("grad_x", gx, cp); !e.empty()) return e;

  // ---- grad_weight, grad_bias
  const pc::WgradPlan pl = pc::plan_wgrad<acc_t>(B, H, W, cp, cs.target_blocks);
  std::vector<acc_t> partial(pl.splits * pc::wgrad_row(cp), std::numeric_limits<acc_t>::quiet_NaN());
  std::vector<T> gw(cp * cp * 9, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
  std::vector<T> gb(cp, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
  pc::WgradParams wp{x.data.data(), x.s, g.data.data(), g.s, B, H, W, cp, pc::channel_fastest(x.s),
                     pc::channel_fastest(g.s)};
  pc::launch_wgrad<T, acc_t>(wp, pl, partial.data(), gw.data(), cs.bias ? gb.data() : nullptr, 0);
  for (int64_t co = 0; co < cp; ++co) {
    for (int64_t ci = 0; ci < cp; ++ci)
      for (int64_t kh = 0; kh < 3; ++kh)
        for (int64_t kw = 0; kw < 3; ++kw) {
          double z = 0, scale = 0;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t y = 0; y < H; ++y)
              for (int64_t xx = 0; xx < W; ++xx) {
                const double t = g.get(b, co, y, xx) * x.pad(b, ci, y + kh - 1, xx + kw - 1);
                z += t;
                scale += std::fabs(t);
              }
          const double got = static_cast<double>(gw[((co * cp + ci) * 3 + kh) * 3 + kw]);
          const std::string e = compare("grad_w", got, z, scale, tol, co, ci, kh, kw);
          if (!e.empty()) return e;
        }
    double z = 0, scale = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) {
          z += g.get(b, co, y, xx);
          scale += std::fabs(g.get(b, co, y, xx));
        }
    if (cs.bias) {
      const std::string e = compare("grad_b", static_cast<double>(gb[co]), z, scale, tol, co, 0, 0, 0);
      if (!e.empty()) return e;
    } else if (!std::isnan(static_cast<double>(gb[co]))) {
      return "  grad_b written without a grad_b pointer";
    }
  }
  return untouched_sums_case<T>(cs, x, g);
}

std::vector<Case> cases() {
  const Layout C = Layout::contiguous, L = Layout::channels_last, S = Layout::strided_w;
  return {
      // FasterNet's n_div 4 on odd sizes; 4-channel blocks, 3x3 pairs with 8 row lanes
      {"fp32", 2, 13, 3, 7, 5, true, C, C, 3},
      {"fp32", 2, 13, 3, 7, 5, false, L, L, 1},
      {"bf16", 2, 13, 3, 7, 5, true, L, C, 4},
      {"fp64", 2, 13, 3, 7, 5, true, S, L, 2},
      // 16-channel blocks (Cp 10), 10x10 pairs with 2 lanes; two tiles down
      {"fp64", 2, 40, 10, 17, 23, true, C, C, 1},
      {"fp32", 2, 40, 10, 17, 23, false, L, L, 8},
      {"bf16", 2, 40, 10, 17, 23, true, S, C, 5},
      {"fp16", 2, 40, 10, 17, 23, true, L, L, 3},
      // the last FasterNet stage: 80 channels (16-channel blocks, 5x5 groups of 16x16 pairs), 7x7
      {"fp32", 2, 320, 80, 7, 7, true, C, C, 40},
      {"fp32", 2, 320, 80, 7, 7, false, L, L, 1},
      {"bf16", 2, 320, 80, 7, 7, true, L, C, 60},
      // 1x1 images
      {"fp32", 3, 8, 4, 1, 1, true, C, C, 3},
      {"fp64", 3, 8, 2, 1, 1, true, L, L, 1},
      // several tiles in both directions (forward 32x16, grad_w 32x8 / 16x8 in fp64)
      {"fp32", 1, 24, 6, 37, 70, true, C, L, 4},
      {"bf16", 1, 24, 6, 37, 70, false, L, L, 2},
      {"fp64", 1, 24, 6, 37, 70, true, S, C, 7},
      // 16-wide tiles, 8-channel blocks, 2x2 groups of 10x10 pairs
      {"fp64", 2, 50, 20, 12, 13, true, S, S, 8},
      {"fp32", 2, 50, 20, 12, 13, false, L, C, 3},
      // Cp 40: 8-channel blocks, 3x3 groups of 14 (the last 12)
      {"fp32", 2, 40, 40, 9, 9, true, C, C, 9},
      // tall and narrow: 8x64 tiles; one channel of one
      {"fp32", 1, 5, 5, 150, 3, true, C, C, 4},
      {"fp32", 2, 3, 1, 6, 6, true, L, C, 2},
  };
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  emu::Report report;
  const std::pair<const char*, emu::Order> orders[] = {{"forward", emu::Order::forward},
                                                       {"reverse", emu::Order::reverse},
                                                       {"warp_serial_reverse", emu::Order::warp_serial_reverse}};
  for (const Case& c : cases()) {
    const std::string name = c.name();
    if (!filter.empty() && name.find(filter) == std::string::npos) continue;
    for (int oi = 0; oi < 3; ++oi) {
      report.run(name, orders[oi].first, [&] {
        const std::string d = c.dtype;
        const uint64_t seed = 1 + oi;
        if (d == "fp32") return run_case<float>(c, orders[oi].second, seed);
        if (d == "fp64") return run_case<double>(c, orders[oi].second, seed);
        if (d == "fp16") return run_case<c10::Half>(c, orders[oi].second, seed);
        return run_case<c10::BFloat16>(c, orders[oi].second, seed);
      });
    }
  }
  return report.finish();
}
