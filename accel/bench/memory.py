"""Peak memory of one call per implementation (the columns ``accel MiB`` and ``peer MiB``).

* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` just before the call
  (peak stats reset before each call), i.e. the extra device memory one call needs.
* CPU: PyTorch keeps no statistics for CPU allocations, so the meter measures the **peak RSS
  increase during one call** in a separate process (``multiprocessing`` spawn, one worker reused
  across cases): the worker builds the same inputs, warms every implementation up on a small
  instance of the case, then for each implementation resets the kernel's RSS high-water mark
  (``/proc/self/clear_refs``), reads ``VmRSS``, makes one call at full size and reads ``VmHWM``.
  In the worker, glibc's ``mmap`` threshold is pinned (``mallopt``) so that every large block is
  mapped on allocation and unmapped on free: freed memory is not silently reused, and RSS tracks
  live allocations. The timing process is left untouched.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import gc
import multiprocessing
import sys
from typing import Dict, Optional, Sequence

import torch

from accel.bench.case import Case, Setup

MiB = 1024 * 1024


def mem_total_bytes() -> Optional[int]:
    """The machine's RAM (``MemTotal`` of /proc/meminfo) in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


CPU_MEM_METHOD = ("peak RSS increase during one call, measured in a separate spawned process "
                  "(after a warm-up on a small instance; accel's CPU buffer cache emptied first; "
                  "glibc mmap threshold pinned)")
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated() increase during one call"


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _pin_malloc() -> bool:
    """Make glibc map every block >= 64 KiB with mmap and unmap it on free (no dynamic threshold)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1
        ok = (libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1) and ok
        return ok
    except OSError:
        return False


_WORKER_STATE = {"pinned": None}


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the benchmark process dies (even by SIGKILL)."""
    try:
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _memory_worker_init(threads: int) -> None:
    _die_with_parent()
    torch.set_num_threads(threads)
    _WORKER_STATE["pinned"] = _pin_malloc()


def accel_cpu_cache_stats() -> Optional[dict]:
    """Stats of accel's cache of large CPU output buffers, or None where there is none."""
    try:
        from accel import memory

        return memory.cpu_cache_stats()
    except Exception:  # not built / no cache in this build
        return None


def empty_accel_cpu_cache() -> bool:
    """Return accel's cached CPU output buffers to the system, so a call pays for (and is charged
    with) every buffer it needs, as the peers are."""
    try:
        from accel import memory

        memory.empty_cpu_cache()
        return True
    except Exception:
        return False


def _memory_task(builder, params: dict, warm_params: Optional[dict], names: Sequence[str]) -> dict:
    """Runs in the memory worker: peak RSS increase (bytes) of one call per implementation."""
    if not _reset_hwm():
        return {"error": "cannot reset the RSS high-water mark (/proc/self/clear_refs)"}
    if warm_params is not None:
        warm = builder(**warm_params)
        for name in names:
            warm.impls[name]()
        del warm
    setup = builder(**params)
    result: Dict[str, object] = {}
    for name in names:
        if setup.reset is not None:
            setup.reset()
        gc.collect()
        empty_accel_cpu_cache()
        base = _status_kb("VmRSS")
        _reset_hwm()
        out = setup.impls[name]()
        peak = _status_kb("VmHWM")
        del out
        result[name] = max(0, peak - base) * 1024
    if setup.reset is not None:
        setup.reset()
    del setup
    gc.collect()
    result["_malloc_pinned"] = _WORKER_STATE["pinned"]
    return result


class MemoryMeter:
    """Measures peak memory of one call per implementation (see the module docstring)."""

    def __init__(self, device: str, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
        self.method = CUDA_MEM_METHOD if device.startswith("cuda") else CPU_MEM_METHOD
        if not enabled:
            self.method = "not measured (--no-mem)"

    def _executor(self):
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=ctx, initializer=_memory_worker_init,
                initargs=(torch.get_num_threads(),),
            )
        return self._pool

    def measure(self, case: Case, setup: Optional[Setup]) -> Dict[str, Optional[int]]:
        """Peak bytes of one call of the baseline and of each peer: on CUDA, of ``setup``'s callables;
        on CPU, of a fresh instance built in the worker (``setup`` unused: pass None, after freeing the
        timing process's inputs)."""
        names = (case.baseline,) + tuple(case.peers)
        if not self.enabled:
            return {n: None for n in names}
        if self.device.startswith("cuda"):
            return self._measure_cuda(names, setup)
        return self._measure_cpu(case, names)

    def _measure_cuda(self, names, setup: Setup) -> Dict[str, Optional[int]]:
        res = {}
        for name in names:
            if setup.reset is not None:
                setup.reset()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = setup.impls[name]()
            torch.cuda.synchronize()
            res[name] = max(0, torch.cuda.max_memory_allocated() - base)
            del out
        if setup.reset is not None:
            setup.reset()
        return res

    def _measure_cpu(self, case: Case, names) -> Dict[str, Optional[int]]:
        try:
            fut = self._executor().submit(_memory_task, case.builder, case.params, case.warm_params, names)
            res = fut.result()
        except Exception as e:  # a crashed or killed worker (e.g. out of memory): report, carry on
            self.close()
            print(f"  [memory] {case.name}: measurement failed: {type(e).__name__}: {e}", file=sys.stderr)
            return {n: None for n in names}
        if "error" in res:
            print(f"  [memory] {res['error']}", file=sys.stderr)
            return {n: None for n in names}
        if res.get("_malloc_pinned") is False:
            self.method = CPU_MEM_METHOD.replace("; glibc mmap threshold pinned", "; mallopt unavailable")
        return {n: res.get(n) for n in names}

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
