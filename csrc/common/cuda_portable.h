// Spellings that let a kernel source compile both with nvcc and, for the CPU emulator used by the
// tests (tests/cpp/cuda_emu.h, found on the test build's include path), with a host compiler and
// ACCEL_CUDA_EMU defined:
//   ACCEL_DYNAMIC_SMEM(type, name)   the block's dynamic shared memory as `type* name`
//   ACCEL_STATIC_SMEM(type, name, count)   a __shared__ array of `count` elements, used as `name`
//   ACCEL_LAUNCH(kernel, grid, block, smem, stream, args...)   kernel<<<grid, block, smem, stream>>>(args...)
#pragma once

#if defined(ACCEL_CUDA_EMU)
#include "cuda_emu.h"

namespace accel::cuda_emu {
inline Dim3 to_dim3(const dim3& d) { return Dim3{d.x, d.y, d.z}; }
inline Dim3 to_dim3(unsigned x) { return Dim3{x, 1, 1}; }
inline Dim3 to_dim3(int x) { return Dim3{static_cast<unsigned>(x), 1, 1}; }
}  // namespace accel::cuda_emu

#define ACCEL_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::accel::cuda_emu::dynamic_smem())
#define ACCEL_STATIC_SMEM(type, name, count) \
  type* name = reinterpret_cast<type*>(::accel::cuda_emu::static_smem(sizeof(type) * (count)))
#define ACCEL_LAUNCH(kernel, grid, block, smem, stream, ...)                                                    \
  ::accel::cuda_emu::launch(::accel::cuda_emu::to_dim3(grid), ::accel::cuda_emu::to_dim3(block), (smem), \
                            [&] { kernel(__VA_ARGS__); })
#else
#define ACCEL_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#define ACCEL_STATIC_SMEM(type, name, count) __shared__ __align__(16) type name[count]
#define ACCEL_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif
