// Warp-level tensor-core building blocks shared by the fp16/bf16 kernels (sm_80+): mma.sync
// m16n8k16 with fp32 accumulation, ldmatrix from shared memory and 16-byte cp.async copies. With
// ACCEL_CUDA_EMU (a host-compiled test build) they forward to the CPU emulator (cuda_emu.h in
// tests/cpp), so the kernels that use them run there unchanged.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = threadIdx.x % 32:
//   A 16x16 (row major): a0 (r, c), a1 (r + 8, c), a2 (r, c + 8), a3 (r + 8, c + 8),
//                        r = lane / 4, c = 2 * (lane % 4) + {0, 1}
//   B 16x8  (k x n):     b0 (k, n), b1 (k + 8, n), k = 2 * (lane % 4) + {0, 1}, n = lane / 4
//   C 16x8:              c0, c1 (r, c), c2, c3 (r + 8, c)
// ldmatrix.x4 loads four 8x8 b16 matrices (.x2: two); lanes 8i..8i+7 give the row addresses of
// matrix i and every lane receives (row lane / 4, cols 2 * (lane % 4) + {0, 1}) of each matrix
// (.trans: the transposed element). A B operand stored [n][k] is read non-transposed; one stored
// [k][n] is read with .trans.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/cuda_portable.h"

namespace accel::cuda_mma {

#if defined(ACCEL_CUDA_EMU)
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) { return ::accel::cuda_emu::shared_address(ptr); }
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::accel::cuda_emu::cp_async_16(smem, gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() { ::accel::cuda_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::accel::cuda_emu::cp_async_wait(N);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  ::accel::cuda_emu::ldmatrix(r, 4, false, addr);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  ::accel::cuda_emu::ldmatrix(r, 4, true, addr);
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  ::accel::cuda_emu::ldmatrix(r, 2, true, addr);
}
#else
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy that bypasses L1; valid = false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
#endif  // ACCEL_CUDA_EMU

// c[0..3] += A (16x16) B (16x8) in fp32; T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float* c, const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float* c, const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(ACCEL_CUDA_EMU)
  ::accel::cuda_emu::mma_m16n8k16(c, a, b0, b1, false);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float* c, const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
#if defined(ACCEL_CUDA_EMU)
  ::accel::cuda_emu::mma_m16n8k16(c, a, b0, b1, true);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats rounded to T and packed into one 32-bit fragment register; lo goes to the low 16 bits
// (the element with the smaller column index in a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

}  // namespace accel::cuda_mma
