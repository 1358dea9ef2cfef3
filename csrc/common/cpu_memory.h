// Output allocation for bandwidth-bound CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace accel {

// An empty CPU tensor for an output that the kernel writes in full.
//
// A fresh multi-MB CPU tensor is a fresh mmap, and first-touch page faults cost more than a
// streaming kernel's own work (several times the cost of writing the memory once resident). Buffers from 8 MiB up therefore come from a small cache of
// 2 MiB-aligned blocks advised for transparent huge pages: a block freed by one tensor is reused
// by the next output of the same size, as the CUDA caching allocator does on the GPU. The cache
// holds at most ACCEL_CPU_CACHE_MB of free blocks (default: a quarter of physical memory, at most
// 4 GiB); 0 disables caching (huge pages are still used). Smaller outputs use at::empty.
at::Tensor empty_for_streaming(at::IntArrayRef sizes, const at::TensorOptions& options);

// A kernel's scratch space, `nbytes` uninitialised bytes that live until the tensor is dropped
// (usually when the call returns). From 1 MiB up it comes from the same block cache, so a kernel
// called in a loop does not fault its workspace in again on every call.
at::Tensor empty_workspace(int64_t nbytes);

struct CpuCacheStats {
  int64_t cached_bytes;   // free blocks held for reuse
  int64_t in_use_bytes;   // blocks owned by live tensors
  int64_t hits, misses;   // allocations served from the cache / from the system
};
CpuCacheStats cpu_cache_stats();
// Returns every free cached block to the system.
void cpu_cache_release();

}  // namespace accel
