// Input checks shared by every op. Messages name the op, the argument, what was expected and
// what was given, so that a user can fix the call without reading the source. A wrong dtype
// raises TypeError in Python (TORCH_CHECK_TYPE), any other bad argument ValueError
// (TORCH_CHECK_VALUE), the same types the Python wrappers raise for their own arguments.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace accel {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", shape_str(t));
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type(), "; they must match");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; they must be on the same device");
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor (float32, float64, bfloat16, float16), got ", t.scalar_type());
}

// `want_name` spells the dtype as users write it ("int32"), not as c10 prints it ("Int").
inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want,
                        const char* want_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", want_name, ", got ", t.scalar_type());
}

// Whether t may overlap `written` (layouts too irregular to tell count when they share a storage).
inline bool shares_memory(const at::Tensor& t, const at::Tensor& written) {
  if (!t.has_storage() || !written.has_storage() || !t.storage().is_alias_of(written.storage())) return false;
  return at::get_overlap_status(t, written) != at::MemOverlapStatus::No;
}

}  // namespace accel
