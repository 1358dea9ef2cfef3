"""accel's cache of large CPU output buffers (see csrc/common/cpu_memory.h).

Outputs of 8 MiB and more that accel's CPU kernels write in full come from 2 MiB-aligned,
huge-page-advised blocks that are reused once their tensor is freed, so that page faults are paid
once rather than on every call. ``ACCEL_CPU_CACHE_MB`` (read at first use; default a quarter of physical memory, at most 4 GiB)
caps the free blocks kept; 0 keeps none.
"""
from __future__ import annotations

from accel import _ext


def cpu_cache_stats() -> dict:
    """``{"cached_bytes", "in_use_bytes", "hits", "misses"}`` of the CPU output-buffer cache."""
    return dict(_ext.load().cpu_cache_stats())


def empty_cpu_cache() -> None:
    """Return every free cached CPU buffer to the system (live tensors are unaffected)."""
    _ext.load().cpu_cache_release()
