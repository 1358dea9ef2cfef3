// Output allocation for bandwidth-bound CPU kernels.
#pragma once

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace accel {

// at::empty, plus a request for transparent huge pages on large buffers. A fresh multi-MB CPU
// tensor is a fresh mmap: with 4 KiB pages, first-touch page faults cost more than a streaming
// kernel's own work (measured: ~45 ms to fault in 128 MiB vs ~10 ms to write it), with 2 MiB
// pages about a third of that. Kernels that write every element use this for their outputs.
inline at::Tensor empty_for_streaming(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (start + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advisory only
  }
#endif
  return t;
}

}  // namespace accel
