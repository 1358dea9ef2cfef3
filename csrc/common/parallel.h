// The CPU task scheduler of accel's kernels.
//
// A kernel lists its work as tasks 0 .. n-1 in memory order. Each worker (an intra-op thread)
// owns a contiguous range of them, [n w / W, n (w + 1) / W), and takes it from the front; a
// worker whose range is done takes the other ranges' last tasks, one at a time, until none is
// left. So a worker streams one contiguous run of memory, and a slow thread or uneven tasks
// (causal masks, experts of different sizes) still balance.
//
// Ranges of cheap, uniform elements (element-wise maps, per-token routing) keep at::parallel_for
// with a grain: one claim per element would cost more than the balancing gains.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace accel::cpu {

namespace detail {
// A range as (end << 32) | begin, one cache line each.
struct alignas(64) TaskRange {
  std::atomic<uint64_t> v;
};
}  // namespace detail

// Hands one worker its tasks (see parallel_task_workers).
class TaskCursor {
 public:
  // Serial: every task, in order.
  explicit TaskCursor(int64_t n) : n_(n) {}
  TaskCursor(detail::TaskRange* ranges, int64_t workers, int64_t w)
      : ranges_(ranges), workers_(workers), w_(w) {}

  // The next task to run, or -1 once every task is taken.
  int64_t next() {
    if (!ranges_) {
      if (last_ + 1 >= n_) return -1;
      return ++last_;
    }
    for (; step_ < workers_; ++step_) {
      const int64_t i = claim((w_ + step_) % workers_, step_ == 0);
      if (i >= 0) return last_ = i;
    }
    return -1;
  }

  // The task this worker will most likely run after the last one next() gave (to prefetch its
  // data); may be outside [0, n).
  int64_t likely_next() const { return step_ == 0 || !ranges_ ? last_ + 1 : last_ - 1; }

 private:
  // One task of range r: its first (own range) or its last (another's); -1 once it is empty.
  int64_t claim(int64_t r, bool front) {
    std::atomic<uint64_t>& range = ranges_[r].v;
    uint64_t v = range.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = v & 0xffffffffu, hi = v >> 32;
      if (lo >= hi) return -1;
      const uint64_t nv = front ? (hi << 32) | (lo + 1) : ((hi - 1) << 32) | lo;
      if (range.compare_exchange_weak(v, nv, std::memory_order_relaxed)) {
        return static_cast<int64_t>(front ? lo : hi - 1);
      }
    }
  }

  detail::TaskRange* ranges_ = nullptr;
  int64_t workers_ = 1, w_ = 0, step_ = 0;
  int64_t n_ = 0, last_ = -1;
};

// Runs worker(cursor) once per worker, on the intra-op threads, for tasks [0, n): the worker
// takes indices from cursor.next() until it returns -1. Per-worker scratch is set up once at the
// start of worker, and per-thread state released at its end. Serial (one worker, the tasks in
// order) for n = 1, one thread, or inside a parallel region.
template <typename F>
void parallel_task_workers(int64_t n, const F& worker) {
  if (n <= 0) return;
  if (n == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    TaskCursor cursor(n);
    worker(cursor);
    return;
  }
  TORCH_CHECK(n < (int64_t(1) << 31), "accel: too many parallel tasks (", n, ")");
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  std::vector<detail::TaskRange> ranges(workers);
  for (int64_t w = 0; w < workers; ++w) {
    ranges[w].v.store((static_cast<uint64_t>(n * (w + 1) / workers) << 32) | static_cast<uint64_t>(n * w / workers),
                      std::memory_order_relaxed);
  }
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      TaskCursor cursor(ranges.data(), workers, w);
      worker(cursor);
    }
  });
}

// Runs fn(i, likely_next) for every task i in [0, n), scheduled as parallel_task_workers does;
// likely_next is TaskCursor::likely_next() after i.
template <typename F>
void parallel_tasks(int64_t n, const F& fn) {
  parallel_task_workers(n, [&](TaskCursor& cursor) {
    for (int64_t i = cursor.next(); i >= 0; i = cursor.next()) fn(i, cursor.likely_next());
  });
}

}  // namespace accel::cpu
