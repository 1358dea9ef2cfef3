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
  TORCH_CHECK(false, op, ": activation must be one of 'none', 'relu', 'gelu', 'silu', got '", name, "'");
}

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
