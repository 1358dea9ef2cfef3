// Activations fused into kernel epilogues, with their derivatives, for host and device code.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace accel {

enum class Activation : int { None = 0, Relu = 1, Gelu = 2, Silu = 3 };

inline Activation parse_activation(const std::string& name, const char* op) {
  if (name == "none" || name.empty()) return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK_VALUE(false, op, ": activation must be one of 'none', 'relu', 'gelu', 'silu', got '", name, "'");
}

// erf by Abramowitz & Stegun 7.1.26, the CPU epilogues' fp32 erf (|error| <= 1.5e-7): for x >= 0,
// erf(x) ~ 1 - (a1 t + a2 t^2 + ... + a5 t^5) e^(-x^2) with t = 1 / (1 + p x). {p, a1, ..., a5}
constexpr float kErfAS[6] = {0.3275911f, 0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f, 1.061405429f};

// GELU is the exact (erf) form, as torch.nn.functional.gelu's default.
template <typename T>
C10_HOST_DEVICE inline T activation_forward(T z, Activation a) {
  switch (a) {
    case Activation::Relu:
      return z > T(0) ? z : T(0);
    case Activation::Gelu:
      return T(0.5) * z * (T(1) + ::erf(z * T(0.70710678118654752440)));
    case Activation::Silu:
      return z / (T(1) + ::exp(-z));
    default:
      return z;
  }
}

// d activation(z) / dz
template <typename T>
C10_HOST_DEVICE inline T activation_grad(T z, Activation a) {
  switch (a) {
    case Activation::Relu:
      return z > T(0) ? T(1) : T(0);
    case Activation::Gelu: {
      const T cdf = T(0.5) * (T(1) + ::erf(z * T(0.70710678118654752440)));
      const T pdf = ::exp(T(-0.5) * z * z) * T(0.39894228040143267794);
      return cdf + z * pdf;
    }
    case Activation::Silu: {
      const T s = T(1) / (T(1) + ::exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    default:
      return T(1);
  }
}

}  // namespace accel
