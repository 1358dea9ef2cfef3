// Tuning knobs read from the environment (for experiments and tests; defaults are the tuned values).
#pragma once

#include <cstdint>
#include <cstdlib>

namespace accel {

// The positive integer in environment variable `name`, else `dflt` (unset, empty, zero, negative
// or not a number).
inline int64_t env_int(const char* name, int64_t dflt) {
  const char* s = std::getenv(name);
  if (!s || !*s) return dflt;
  const long v = std::strtol(s, nullptr, 10);
  return v > 0 ? v : dflt;
}

}  // namespace accel
