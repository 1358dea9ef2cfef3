// C++ test of accel::dilated_conv1d through the dispatcher (as a libtorch user calls it):
// against a direct loop, and a bad argument must raise c10::Error with a useful message.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

namespace {

using ConvFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t, c10::string_view);

at::Tensor naive(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t d, int64_t pad_left,
                 int64_t out_len, int64_t groups) {
  const int64_t B = x.size(0), Cin = x.size(1), L = x.size(2), Cout = w.size(0), Cin_g = w.size(1), K = w.size(2);
  const int64_t Cout_g = Cout / groups;
  auto out = at::zeros({B, Cout, out_len}, x.options());
  auto xa = x.accessor<double, 3>();
  auto wa = w.accessor<double, 3>();
  auto ba = b.accessor<double, 1>();
  auto oa = out.accessor<double, 3>();
  for (int64_t bi = 0; bi < B; ++bi)
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t t = 0; t < out_len; ++t) {
        double s = ba[co];
        for (int64_t ci = 0; ci < Cin_g; ++ci)
          for (int64_t k = 0; k < K; ++k) {
            const int64_t idx = t + k * d - pad_left;
            if (idx >= 0 && idx < L) s += wa[co][ci][k] * xa[bi][(co / Cout_g) * Cin_g + ci][idx];
          }
        oa[bi][co][t] = s;
      }
  (void)Cin;
  return out;
}

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("accel::dilated_conv1d", "").typed<ConvFn>();
  at::manual_seed(0);
  struct Case { int64_t B, Cin, Cout, L, K, d, pad_left, out_len, groups; };
  const Case cases[] = {
      {2, 4, 4, 37, 3, 2, 4, 37, 4},     // depthwise causal
      {1, 6, 6, 5000, 7, 64, 192, 5000, 6},  // depthwise, same-style padding, long
      {2, 6, 9, 31, 4, 3, 2, 26, 3},     // grouped, symmetric int padding
      {1, 3, 5, 20, 1, 1, 0, 20, 1},     // dense, K = 1
      {2, 2, 2, 3, 9, 8, 64, 3, 2},      // L far shorter than the receptive field
  };
  for (const auto& c : cases) {
    auto x = at::randn({c.B, c.Cin, c.L}, at::kDouble);
    auto w = at::randn({c.Cout, c.Cin / c.groups, c.K}, at::kDouble);
    auto b = at::randn({c.Cout}, at::kDouble);
    auto got = op.call(x, w, b, std::nullopt, c.d, c.pad_left, c.out_len, c.groups, "none");
    auto want = naive(x, w, b, c.d, c.pad_left, c.out_len, c.groups);
    const double err = (got - want).abs().max().item<double>();
    expect(err < 1e-9, "B=" + std::to_string(c.B) + " Cin=" + std::to_string(c.Cin) + " Cout=" +
                           std::to_string(c.Cout) + " L=" + std::to_string(c.L) + " K=" + std::to_string(c.K) +
                           " d=" + std::to_string(c.d) + " groups=" + std::to_string(c.groups) +
                           " max err " + std::to_string(err));
  }
  // fp32 and a fused activation: relu(conv) equals the loop's result clamped at zero
  {
    auto x = at::randn({2, 8, 300}, at::kFloat);
    auto w = at::randn({8, 1, 5}, at::kFloat);
    auto b = at::randn({8}, at::kFloat);
    auto got = op.call(x, w, b, std::nullopt, 3, 12, 300, 8, "relu");
    auto want = naive(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), 3, 12, 300, 8).clamp_min(0);
    expect((got.to(at::kDouble) - want).abs().max().item<double>() < 1e-4, "fp32 depthwise with fused relu");
  }
  // a bad argument raises c10::Error naming it
  try {
    op.call(at::randn({1, 4, 10}), at::randn({3, 1, 3}), std::nullopt, std::nullopt, 1, 2, 10, 3, "none");
    expect(false, "groups not dividing C_in raises");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find("groups=3 must divide the input channels") != std::string::npos,
           "groups not dividing C_in raises a clear c10::Error");
  }
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
