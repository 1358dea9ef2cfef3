// A CPU emulator for this project's CUDA kernels, for tests on machines without a GPU.
//
// Compiled with a host compiler (never nvcc) and ACCEL_CUDA_EMU defined, a kernel source that
// uses the portable spellings of csrc/common/cuda_portable.h (shared memory, launches) and the
// warp-level wrappers of csrc/common/cuda_mma.cuh runs here: every CUDA thread is a fiber
// (ucontext) with its own stack, and a scheduler runs the fibers of one block, one at a time, up
// to their next synchronisation point.
//   - __syncthreads / __syncwarp: rendezvous of every live thread of the block / warp.
//   - warp collectives (ldmatrix, mma.sync): each lane parks its operands; when all 32 lanes of the
//     warp wait at the same collective, the scheduler computes the warp-wide result.
//   - cp.async: the 16 bytes are captured when issued and written to shared memory either at once
//     (CpAsyncMode::early) or only when cp.async.wait_group retires their group (late), so a
//     missing wait and a write into a buffer other warps still read both change the result.
//   - a block's shared memory is its dynamic part followed by its static arrays (in the order the
//     kernel declares them), all filled with 0xff bytes (NaN as fp16/bf16/fp32): reading what
//     nobody wrote shows up in the output.
//   - the threads of a block run in lockstep (forward, reverse or shuffled order) or warp by warp,
//     each warp as far as the next __syncthreads before the next warp starts (warp_serial, in
//     either direction): a missing barrier between one warp's writes and another's reads, or
//     before a buffer is overwritten, changes the result under at least one of them.
// A warp collective reached by only some lanes, or a barrier that can never be released, aborts
// with a message naming the block and the threads' states.
//
// This checks indexing, fragment layouts, masking and synchronisation logic; it does not model
// timing, the memory consistency of concurrent threads beyond the cases above, or the exact
// rounding of the tensor cores (the mma accumulates in fp32 in k order).
#pragma once

#if !defined(ACCEL_CUDA_EMU) || defined(__CUDACC__)
#error "cuda_emu.h is for host-compiled emulation builds (ACCEL_CUDA_EMU, no nvcc)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace accel::cuda_emu {

enum class CpAsyncMode { early, late };
enum class Order { forward, reverse, shuffled, warp_serial, warp_serial_reverse };

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

enum class Wait { none, block_barrier, warp_barrier, collective };
enum class Op { none, ldmatrix, mma };

struct Lane {
  ucontext_t ctx{};
  Dim3 thread_idx;
  int linear = 0;
  bool done = false;
  int static_seen = 0;  // static shared arrays this thread has declared so far
  Wait wait = Wait::none;
  // the parked operands of a warp collective
  Op op = Op::none;
  uint32_t addr = 0;
  int count = 0;
  bool trans = false, bf16 = false;
  uint32_t a[4] = {0, 0, 0, 0};
  uint32_t b0 = 0, b1 = 0;
  float* c = nullptr;
  uint32_t* out = nullptr;
  // cp.async: copies of the open group, then committed groups (oldest first)
  struct Copy {
    unsigned char* dst;
    unsigned char bytes[16];
  };
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> committed;
};

struct State {
  CpAsyncMode cp_mode = CpAsyncMode::late;
  Order order = Order::forward;
  uint64_t seed = 1;
  Dim3 grid, block, block_idx;
  std::vector<unsigned char> smem;  // dynamic part, then the static arrays
  size_t smem_dynamic = 0, smem_used = 0;
  std::vector<size_t> static_offsets;  // of the block's static arrays, in declaration order
  std::vector<Lane> lanes;
  std::vector<std::vector<char>> stacks;
  Lane* current = nullptr;
  ucontext_t scheduler{};
  const std::function<void()>* body = nullptr;
  int64_t blocks_run = 0, collectives = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline void set_cp_async_mode(CpAsyncMode m) { state().cp_mode = m; }
inline void set_order(Order o, uint64_t seed = 1) {
  state().order = o;
  state().seed = seed;
}

inline Lane* current() {
  Lane* l = state().current;
  if (l == nullptr) {
    std::fprintf(stderr, "cuda_emu: device code called outside a launch\n");
    std::abort();
  }
  return l;
}

[[noreturn]] inline void fail(const char* what) {
  const State& s = state();
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u)\n", what, s.block_idx.x, s.block_idx.y, s.block_idx.z);
  std::abort();
}

// Parks the current fiber until the scheduler releases it.
inline void yield_until_released(Wait w) {
  Lane* l = current();
  l->wait = w;
  State& s = state();
  swapcontext(&l->ctx, &s.scheduler);
  s.current = l;
}

// ------------------------------------------------------------------ shared memory addresses

inline unsigned char* dynamic_smem() { return state().smem.data(); }

// The 32-bit shared-window address of a pointer into the block's shared memory: its offset.
inline uint32_t shared_address(const void* p) {
  State& s = state();
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < s.smem.data() || c > s.smem.data() + s.smem_used) {
    fail("a shared-memory address outside the block's shared memory");
  }
  return static_cast<uint32_t>(c - s.smem.data());
}

inline unsigned char* shared_at(uint32_t addr, uint32_t bytes) {
  State& s = state();
  if (static_cast<uint64_t>(addr) + bytes > s.smem_used) fail("a shared-memory access past the end of shared memory");
  return s.smem.data() + addr;
}

// A __shared__ array of the kernel: every thread of the block gets the same storage for its k-th
// declaration. It lies after the dynamic part and the earlier arrays, 16-byte aligned.
constexpr size_t kStaticSmemLimit = 48 * 1024;
inline unsigned char* static_smem(size_t bytes) {
  State& s = state();
  Lane* l = current();
  const size_t k = static_cast<size_t>(l->static_seen++);
  if (k == s.static_offsets.size()) {
    const size_t off = (s.smem_used + 15) / 16 * 16;
    if (off + bytes - s.smem_dynamic > kStaticSmemLimit) fail("static shared memory over 48 KiB");
    s.static_offsets.push_back(off);
    s.smem_used = off + bytes;
  }
  return s.smem.data() + s.static_offsets[k];
}

// ------------------------------------------------------------------ barriers and atomics

inline void syncthreads() { yield_until_released(Wait::block_barrier); }
inline void syncwarp() { yield_until_released(Wait::warp_barrier); }

// ------------------------------------------------------------------ cp.async

inline void cp_async_apply(std::vector<Lane::Copy>& copies) {
  for (auto& c : copies) std::memcpy(c.dst, c.bytes, 16);
  copies.clear();
}

inline void cp_async_16(void* dst_smem, const void* src, bool valid) {
  Lane::Copy c;
  c.dst = shared_at(shared_address(dst_smem), 16);
  if (reinterpret_cast<uintptr_t>(dst_smem) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    fail("cp.async with a 16-byte copy that is not 16-byte aligned");
  }
  if (valid) {
    std::memcpy(c.bytes, src, 16);
  } else {
    std::memset(c.bytes, 0, 16);
  }
  if (state().cp_mode == CpAsyncMode::early) {
    std::memcpy(c.dst, c.bytes, 16);
  } else {
    current()->open.push_back(c);
  }
}

inline void cp_async_commit() {
  Lane* l = current();
  l->committed.push_back(std::move(l->open));
  l->open.clear();
}

inline void cp_async_wait(int n) {
  Lane* l = current();
  while (static_cast<int>(l->committed.size()) > n) {
    cp_async_apply(l->committed.front());
    l->committed.erase(l->committed.begin());
  }
}

// ------------------------------------------------------------------ warp collectives

inline void ldmatrix(uint32_t* out, int count, bool trans, uint32_t addr) {
  Lane* l = current();
  l->op = Op::ldmatrix;
  l->out = out;
  l->count = count;
  l->trans = trans;
  l->addr = addr;
  yield_until_released(Wait::collective);
}

inline void mma_m16n8k16(float* c, const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Lane* l = current();
  l->op = Op::mma;
  for (int i = 0; i < 4; ++i) l->a[i] = a[i];
  l->b0 = b0;
  l->b1 = b1;
  l->c = c;
  l->bf16 = bf16;
  yield_until_released(Wait::collective);
}

inline float b16_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

inline uint16_t lo16(uint32_t u) { return static_cast<uint16_t>(u & 0xffff); }
inline uint16_t hi16(uint32_t u) { return static_cast<uint16_t>(u >> 16); }

// lanes: the 32 lanes of one warp, all parked at the same collective.
inline void run_ldmatrix(Lane* const* lanes) {
  const int count = lanes[0]->count;
  const bool trans = lanes[0]->trans;
  for (int i = 1; i < 32; ++i) {
    if (lanes[i]->count != count || lanes[i]->trans != trans) fail("ldmatrix with different shapes across a warp");
  }
  for (int m = 0; m < count; ++m) {
    uint16_t tile[8][8];
    for (int r = 0; r < 8; ++r) {
      const uint32_t addr = lanes[8 * m + r]->addr;
      if (addr % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
      std::memcpy(tile[r], shared_at(addr, 16), 16);
    }
    for (int ln = 0; ln < 32; ++ln) {
      const int g = ln / 4, t = ln % 4;
      uint16_t e0, e1;
      if (trans) {
        e0 = tile[2 * t][g];
        e1 = tile[2 * t + 1][g];
      } else {
        e0 = tile[g][2 * t];
        e1 = tile[g][2 * t + 1];
      }
      lanes[ln]->out[m] = static_cast<uint32_t>(e0) | (static_cast<uint32_t>(e1) << 16);
    }
  }
}

inline void run_mma(Lane* const* lanes) {
  const bool bf16 = lanes[0]->bf16;
  float A[16][16], B[16][8], C[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    const Lane* l = lanes[ln];
    if (l->bf16 != bf16) fail("mma with different types across a warp");
    const int g = ln / 4, t = ln % 4;
    const uint32_t* a = l->a;
    A[g][2 * t] = b16_to_float(lo16(a[0]), bf16);
    A[g][2 * t + 1] = b16_to_float(hi16(a[0]), bf16);
    A[g + 8][2 * t] = b16_to_float(lo16(a[1]), bf16);
    A[g + 8][2 * t + 1] = b16_to_float(hi16(a[1]), bf16);
    A[g][2 * t + 8] = b16_to_float(lo16(a[2]), bf16);
    A[g][2 * t + 9] = b16_to_float(hi16(a[2]), bf16);
    A[g + 8][2 * t + 8] = b16_to_float(lo16(a[3]), bf16);
    A[g + 8][2 * t + 9] = b16_to_float(hi16(a[3]), bf16);
    B[2 * t][g] = b16_to_float(lo16(l->b0), bf16);
    B[2 * t + 1][g] = b16_to_float(hi16(l->b0), bf16);
    B[2 * t + 8][g] = b16_to_float(lo16(l->b1), bf16);
    B[2 * t + 9][g] = b16_to_float(hi16(l->b1), bf16);
    C[g][2 * t] = l->c[0];
    C[g][2 * t + 1] = l->c[1];
    C[g + 8][2 * t] = l->c[2];
    C[g + 8][2 * t + 1] = l->c[3];
  }
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 8; ++n) {
      float acc = C[r][n];
      for (int k = 0; k < 16; ++k) acc = std::fma(A[r][k], B[k][n], acc);
      C[r][n] = acc;
    }
  }
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln / 4, t = ln % 4;
    float* c = lanes[ln]->c;
    c[0] = C[g][2 * t];
    c[1] = C[g][2 * t + 1];
    c[2] = C[g + 8][2 * t];
    c[3] = C[g + 8][2 * t + 1];
  }
}

// ------------------------------------------------------------------ the scheduler

inline void fiber_entry() {
  State& s = state();
  (*s.body)();
  Lane* l = s.current;
  // copies still in flight land anyway
  for (auto& g : l->committed) cp_async_apply(g);
  l->committed.clear();
  cp_async_apply(l->open);
  l->done = true;
  l->wait = Wait::none;
  swapcontext(&l->ctx, &s.scheduler);
}

inline const char* wait_name(Wait w) {
  switch (w) {
    case Wait::none: return "running";
    case Wait::block_barrier: return "__syncthreads";
    case Wait::warp_barrier: return "__syncwarp";
    case Wait::collective: return "a warp collective";
  }
  return "?";
}

[[noreturn]] inline void deadlock() {
  State& s = state();
  for (const Lane& l : s.lanes) {
    std::fprintf(stderr, "  thread %d: %s\n", l.linear, l.done ? "exited" : wait_name(l.wait));
  }
  fail("no thread can make progress (a barrier or collective that not every thread reaches)");
}

// Releases what can be released in warps [w_first, w_last): a warp whose live lanes all wait at
// the same collective (computed now) or at __syncwarp. Returns whether anything was released.
inline bool resolve_warps(int w_first, int w_last) {
  State& s = state();
  bool released = false;
  const int n = static_cast<int>(s.lanes.size());
  for (int w = w_first; w < w_last; ++w) {
    const int w0 = 32 * w;
    Lane* warp[32];
    int live = 0, at_coll = 0, at_wbar = 0;
    const int width = std::min(32, n - w0);
    for (int i = 0; i < width; ++i) {
      warp[i] = &s.lanes[w0 + i];
      if (!warp[i]->done) {
        ++live;
        at_coll += warp[i]->wait == Wait::collective;
        at_wbar += warp[i]->wait == Wait::warp_barrier;
      }
    }
    if (live == 0) continue;
    if (at_wbar == live) {
      for (int i = 0; i < width; ++i) {
        if (!warp[i]->done) warp[i]->wait = Wait::none;
      }
      released = true;
    } else if (at_coll > 0 && at_coll == live) {
      if (live != 32) fail("a warp collective (ldmatrix / mma.sync) reached by only some lanes of a warp");
      const Op op = warp[0]->op;
      for (int i = 1; i < 32; ++i) {
        if (warp[i]->op != op) fail("lanes of one warp at different collectives");
      }
      if (op == Op::ldmatrix) {
        run_ldmatrix(warp);
      } else {
        run_mma(warp);
      }
      ++s.collectives;
      for (int i = 0; i < 32; ++i) warp[i]->wait = Wait::none;
      released = true;
    }
  }
  return released;
}

// Releases the block barrier once every live thread waits there.
inline bool resolve_block_barrier() {
  State& s = state();
  int live = 0, at_bar = 0;
  for (const Lane& l : s.lanes) {
    if (!l.done) {
      ++live;
      at_bar += l.wait == Wait::block_barrier;
    }
  }
  if (live == 0 || at_bar != live) return false;
  for (Lane& l : s.lanes) l.wait = Wait::none;
  return true;
}

// Runs the runnable lanes among `lanes` (in that order) up to their next synchronisation point.
inline bool run_lanes(const std::vector<int>& lanes) {
  State& s = state();
  bool ran = false;
  for (const int i : lanes) {
    Lane& l = s.lanes[i];
    if (l.done || l.wait != Wait::none) continue;
    s.current = &l;
    swapcontext(&s.scheduler, &l.ctx);
    s.current = nullptr;
    ran = true;
  }
  return ran;
}

inline bool all_done() {
  for (const Lane& l : state().lanes) {
    if (!l.done) return false;
  }
  return true;
}

// Lockstep orders: every thread runs to its next synchronisation point, then whatever can be
// released is. Warp-serial orders: one warp at a time runs as far as it can (up to a block
// barrier), then the next: warps drift a whole barrier interval apart, so a missing
// __syncthreads between one warp's writes and another's reads changes what is read.
inline void run_block(const std::vector<int>& order) {
  State& s = state();
  const int n = static_cast<int>(s.lanes.size());
  const int warps = (n + 31) / 32;
  const bool serial = s.order == Order::warp_serial || s.order == Order::warp_serial_reverse;
  std::vector<std::vector<int>> warp_lanes(warps);
  for (const int i : order) warp_lanes[i / 32].push_back(i);
  while (!all_done()) {
    bool progress = false;
    if (serial) {
      for (int k = 0; k < warps; ++k) {
        const int w = s.order == Order::warp_serial ? k : warps - 1 - k;
        for (;;) {
          const bool ran = run_lanes(warp_lanes[w]);
          const bool released = resolve_warps(w, w + 1);
          if (!ran && !released) break;
          progress = true;
        }
      }
    } else {
      progress = run_lanes(order);
      progress = resolve_warps(0, warps) || progress;
    }
    progress = resolve_block_barrier() || progress;
    if (!progress && !all_done()) deadlock();
  }
}

// Runs body once per thread of every block of the grid (blocks one after another).
inline void launch(Dim3 grid, Dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  State& s = state();
  constexpr size_t kStack = 256 * 1024;
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024) fail("block size out of range");
  s.grid = grid;
  s.block = block;
  s.body = &body;
  if (s.stacks.size() < static_cast<size_t>(nthreads)) s.stacks.resize(nthreads);
  for (auto& st : s.stacks) st.resize(kStack);
  std::mt19937_64 rng(s.seed);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = Dim3{bx, by, bz};
        // capacity for the static arrays too, so that their pointers stay valid
        s.smem.assign(smem_bytes + 16 + kStaticSmemLimit, 0xff);
        s.smem_dynamic = s.smem_used = smem_bytes;
        s.static_offsets.clear();
        s.lanes.assign(nthreads, Lane{});
        std::vector<int> order(nthreads);
        for (int i = 0; i < nthreads; ++i) {
          Lane& l = s.lanes[i];
          l.linear = i;
          l.thread_idx = Dim3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                              static_cast<unsigned>(i / (block.x * block.y))};
          getcontext(&l.ctx);
          l.ctx.uc_stack.ss_sp = s.stacks[i].data();
          l.ctx.uc_stack.ss_size = kStack;
          l.ctx.uc_link = nullptr;
          makecontext(&l.ctx, fiber_entry, 0);
          order[i] = i;
        }
        if (s.order == Order::reverse) std::reverse(order.begin(), order.end());
        if (s.order == Order::shuffled) std::shuffle(order.begin(), order.end(), rng);
        run_block(order);
        ++s.blocks_run;
      }
    }
  }
  s.lanes.clear();
  s.body = nullptr;
}

// The emulator tests' output: one line per case and schedule, then the summary ctest's log shows.
class Report {
 public:
  // Times the case run by fn (returns "" when it passed, else what failed) and prints its line.
  template <class Fn>
  void run(const std::string& name, const char* schedule, Fn&& fn) {
    const auto t = std::chrono::steady_clock::now();
    const std::string detail = fn();
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    std::printf("%s  %-44s %-22s %.2fs%s\n", detail.empty() ? "ok  " : "FAIL", name.c_str(), schedule, sec,
                detail.c_str());
    std::fflush(stdout);
    (detail.empty() ? passed_ : failed_) += 1;
  }
  // Prints the summary; the process exit code.
  int finish() const {
    const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    std::printf("%d passed, %d failed (%.1f s, %lld emulated blocks, %lld warp collectives)\n", passed_, failed_,
                total, static_cast<long long>(state().blocks_run), static_cast<long long>(state().collectives));
    return failed_ == 0 ? 0 : 1;
  }

 private:
  int passed_ = 0, failed_ = 0;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

}  // namespace accel::cuda_emu

// ------------------------------------------------------------------ the CUDA names device code uses

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (::accel::cuda_emu::current()->thread_idx)
#define blockIdx (::accel::cuda_emu::state().block_idx)
#define blockDim (::accel::cuda_emu::state().block)
#define gridDim (::accel::cuda_emu::state().grid)

inline void __syncthreads() { ::accel::cuda_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::accel::cuda_emu::syncwarp(); }
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }

// The CUDA runtime calls of the launchers (cudart itself is not linked): defined in the one
// translation unit that defines ACCEL_CUDA_EMU_RUNTIME.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
#if defined(ACCEL_CUDA_EMU_RUNTIME)
extern "C" {
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
}
#endif
using std::max;
using std::min;
