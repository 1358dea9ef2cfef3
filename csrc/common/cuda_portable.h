// Spellings that let a kernel source compile both with nvcc and, for the CPU emulator used by the
// tests (csrc/common/cuda_emu.h), with a host compiler and ACCEL_CUDA_EMU defined:
//   ACCEL_DYNAMIC_SMEM(type, name)   the block's dynamic shared memory as `type* name`
//   ACCEL_LAUNCH(kernel, grid, block, smem, stream, args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   ACCEL_CUDA_EMU_ONLY(...) / ACCEL_CUDA_DEVICE_ONLY(...)   code for one build only
#pragma once

#if defined(ACCEL_CUDA_EMU)
#include "common/cuda_emu.h"

namespace accel::cuda_emu {
inline Dim3 to_dim3(const dim3& d) { return Dim3{d.x, d.y, d.z}; }
inline Dim3 to_dim3(unsigned x) { return Dim3{x, 1, 1}; }
inline Dim3 to_dim3(int x) { return Dim3{static_cast<unsigned>(x), 1, 1}; }
}  // namespace accel::cuda_emu

#define ACCEL_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::accel::cuda_emu::dynamic_smem())
#define ACCEL_LAUNCH(kernel, grid, block, smem, stream, ...)                                                    \
  ::accel::cuda_emu::launch(::accel::cuda_emu::to_dim3(grid), ::accel::cuda_emu::to_dim3(block), (smem), \
                            [&] { kernel(__VA_ARGS__); })
#else
#define ACCEL_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#define ACCEL_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif
