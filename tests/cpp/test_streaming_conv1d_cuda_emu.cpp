// The streaming convolution's CUDA kernels (csrc/streaming_conv1d/cuda/streaming_conv1d_kernels.cuh)
// run on the CPU through the emulator in cuda_emu.h, for fp32, fp64 and bf16, against a float64
// host reference of the output and the advanced state: depthwise decode steps (the fused kernel)
// with padding rows and out-of-range slots, long depthwise chunks and grouped/dense convolutions
// (the output kernel, then the state kernel), a state longer than the receptive field, K = 1.
// Outputs start as NaN so a missed write shows; threads run in forward and reverse order.
//
// Build: the top-level CMakeLists.txt (needs the CUDA and torch headers, links c10).
// Run:   test_streaming_conv1d_cuda_emu [filter]   (exit 1 on any failure)
#define ACCEL_CUDA_EMU_RUNTIME
#include "streaming_conv1d/cuda/streaming_conv1d_kernels.cuh"

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace sc = accel::streaming_conv1d::cuda;
namespace emu = accel::cuda_emu;

namespace {

struct Case {
  std::string name;
  int64_t batch, c_in, c_out, groups, kernel, dilation, chunk, extra_state;  // L_s = (K-1)*d + extra
  accel::Activation act;
  std::vector<int32_t> slots;  // empty: row b uses slot b
  int64_t n_slots = 0;
};

double act_ref(double z, accel::Activation a) { return accel::activation_forward<double>(z, a); }

template <typename T>
std::string run_case(const Case& c, emu::Order order, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  const int64_t cig = c.c_in / c.groups, cog = c.c_out / c.groups, span = (c.kernel - 1) * c.dilation;
  const int64_t ls = span + c.extra_state, S = c.slots.empty() ? c.batch : c.n_slots, h = c.chunk;
  auto fill = [&](std::vector<T>& v, int64_t n) {
    v.resize(n);
    for (auto& e : v) e = static_cast<T>(nd(rng));
  };
  std::vector<T> x, state, w, bias;
  fill(x, c.batch * c.c_in * h);
  fill(state, S * c.c_in * ls);
  fill(w, c.c_out * cig * c.kernel);
  fill(bias, c.c_out);
  const std::vector<T> state0 = state;
  std::vector<T> out(c.batch * c.c_out * h, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));

  sc::Params p{x.data(), state.data(), w.data(), bias.data(), c.slots.empty() ? nullptr : c.slots.data(), out.data(),
               c.batch, c.c_in, c.c_out, h, c.kernel, c.dilation, cig, cog, S, ls, c.c_in * h, h, 1, c.act};
  emu::set_order(order, seed);
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  sc::launch<T, acc_t>(p, 0);

  // float64 reference from the initial values
  const double tol = std::is_same_v<T, double> ? 1e-12 : std::is_same_v<T, float> ? 1e-4 : 2e-2;
  std::vector<double> want_state(state0.size());
  for (size_t i = 0; i < state0.size(); ++i) want_state[i] = static_cast<double>(state0[i]);
  for (int64_t b = 0; b < c.batch; ++b) {
    int64_t s = c.slots.empty() ? b : c.slots[b];
    if (s >= S) s = -1;
    auto u = [&](int64_t ci, int64_t j) {
      return j < ls ? static_cast<double>(state0[(s * c.c_in + ci) * ls + j]) : static_cast<double>(x[(b * c.c_in + ci) * h + j - ls]);
    };
    for (int64_t co = 0; co < c.c_out; ++co) {
      for (int64_t t = 0; t < h; ++t) {
        double z = 0;
        if (s >= 0) {
          z = static_cast<double>(bias[co]);
          const int64_t ci0 = (co / cog) * cig;
          for (int64_t ci = 0; ci < cig; ++ci)
            for (int64_t k = 0; k < c.kernel; ++k)
              z += static_cast<double>(w[(co * cig + ci) * c.kernel + k]) * u(ci0 + ci, ls + t - (c.kernel - 1 - k) * c.dilation);
          z = act_ref(z, c.act);
        }
        const double got = static_cast<double>(out[(b * c.c_out + co) * h + t]);
        if (!(std::fabs(got - z) <= tol * (1 + std::fabs(z)))) {
          char buf[160];
          std::snprintf(buf, sizeof buf, "  out[%lld,%lld,%lld] = %g, want %g", (long long)b, (long long)co, (long long)t, got, z);
          return buf;
        }
      }
    }
    if (s < 0) continue;
    for (int64_t ci = 0; ci < c.c_in; ++ci)
      for (int64_t j = 0; j < ls; ++j) want_state[(s * c.c_in + ci) * ls + j] = u(ci, j + h);
  }
  for (size_t i = 0; i < state.size(); ++i) {
    if (static_cast<double>(state[i]) != want_state[i]) {
      char buf[120];
      std::snprintf(buf, sizeof buf, "  state[%zu] = %g, want %g", i, static_cast<double>(state[i]), want_state[i]);
      return buf;
    }
  }
  return "";
}

std::vector<Case> cases() {
  using accel::Activation;
  std::vector<Case> cs;
  cs.push_back({"fp32 depthwise decode K4 silu, slots", 5, 37, 37, 37, 4, 1, 1, 1, Activation::Silu, {3, -1, 0, 9, 5}, 6});
  cs.push_back({"bf16 depthwise decode K4 silu", 3, 300, 300, 300, 4, 1, 1, 0, Activation::Silu});
  cs.push_back({"fp64 depthwise h5 K3 d4 gelu", 2, 9, 9, 9, 3, 4, 5, 2, Activation::Gelu});
  cs.push_back({"fp32 depthwise long h45 K5 d3 relu", 2, 7, 7, 7, 5, 3, 45, 0, Activation::Relu, {1, 0}, 2});
  cs.push_back({"fp32 grouped h13 C6->9 g3 K2 d3", 3, 6, 9, 3, 2, 3, 13, 0, Activation::None, {2, -1, 0}, 4});
  cs.push_back({"bf16 dense h7 C5->4 K3 d2 silu", 2, 5, 4, 1, 3, 2, 7, 3, Activation::Silu});
  cs.push_back({"fp64 dense h20 longer than state, K1", 2, 3, 2, 1, 1, 1, 20, 4, Activation::None});
  cs.push_back({"fp32 depthwise h40 > state, K3 d2", 2, 4, 4, 4, 3, 2, 40, 1, Activation::None});
  return cs;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  emu::Report report;
  const std::pair<const char*, emu::Order> orders[] = {{"forward", emu::Order::forward},
                                                       {"reverse", emu::Order::reverse}};
  for (const Case& c : cases()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    for (int oi = 0; oi < 2; ++oi) {
      report.run(c.name, orders[oi].first, [&] {
        if (c.name.rfind("fp32", 0) == 0) return run_case<float>(c, orders[oi].second, 1 + oi);
        if (c.name.rfind("fp64", 0) == 0) return run_case<double>(c, orders[oi].second, 1 + oi);
        return run_case<c10::BFloat16>(c, orders[oi].second, 1 + oi);
      });
    }
  }
  return report.finish();
}
