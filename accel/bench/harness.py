"""The benchmark harness behind ``python -m accel.bench``.

Every case times accel and its peers **in the same process, interleaved**: after a warm-up, each
round calls every implementation once (A, B, C, then B, C, A, ...: the starting implementation
rotates so no implementation always follows the same one), and the reported time is the median
over rounds. Drift (thermal, frequency, a neighbour's load) therefore hits every implementation
alike, and the ratio ``peer / accel`` is what to read (``> 1`` means accel is faster).

Memory:

* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` just before the call
  (peak stats reset before each call), i.e. the extra device memory one call needs.
* CPU: PyTorch keeps no statistics for CPU allocations, so the harness measures the **peak RSS
  increase during one call** in a separate process (``multiprocessing`` spawn, one worker reused
  across cases): the worker builds the same inputs, warms every implementation up on a small
  instance of the case, then for each implementation resets the kernel's RSS high-water mark
  (``/proc/self/clear_refs``), reads ``VmRSS``, makes one call at full size and reads ``VmHWM``.
  In the worker, glibc's ``mmap`` threshold is pinned (``mallopt``) so that every large block is
  mapped on allocation and unmapped on free: freed memory is not silently reused, and RSS tracks
  live allocations. The timing process is left untouched.

Adding an op: write ``accel/bench/<group>.py`` with ``cases(args) -> list[Case]`` (see
:mod:`accel.bench.conv`) and name the group in the op's capability record (``bench=``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import datetime
import gc
import importlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def _bench_groups() -> Dict[str, str]:
    """Case group -> module providing ``cases(args) -> list[Case]``, from the ops' capability records."""
    from accel import _ext

    if not _ext.available():
        return {}
    from accel.ops import capabilities

    return {cap.bench: f"accel.bench.{cap.bench}" for cap in capabilities().values() if cap.bench}


OPS: Dict[str, str] = _bench_groups()

SIZES = ("tiny", "quick", "full")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

MiB = 1024 * 1024


# --------------------------------------------------------------------------- cases

@dataclass
class Setup:
    """What a case builder returns: zero-argument callables, each doing the timed work once.

    ``impls`` maps an implementation name to its callable; the callable's return value is used
    only by the correctness check (forward: the output; forward+backward: the gradients).
    ``reset`` (optional) drops state the callables leave behind (``.grad``), so a memory
    measurement does not start with the previous implementation's gradients alive.
    """

    impls: Dict[str, Callable[[], object]]
    reset: Optional[Callable[[], None]] = None


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


def no_grad_setup(fns: Dict[str, Callable[[], object]]) -> Setup:
    """A forward :class:`Setup`: each callable runs under ``torch.no_grad()``."""
    def wrap(f):
        def run():
            with torch.no_grad():
                return f()
        return run
    return Setup({name: wrap(f) for name, f in fns.items()})


def backward_setup(fns: Dict[str, Callable[[], torch.Tensor]], leaves: Sequence[torch.Tensor],
                   grad_out: torch.Tensor) -> Setup:
    """A forward+backward :class:`Setup`: each callable's output is backpropagated with
    ``grad_out``; the callable returns the gradients of ``leaves`` (which ``reset`` clears)."""
    def reset():
        for t in leaves:
            t.grad = None

    def wrap(f):
        def run():
            reset()
            f().backward(grad_out)
            return tuple(t.grad for t in leaves)
        return run
    return Setup({name: wrap(f) for name, f in fns.items()}, reset=reset)


@dataclass
class Case:
    """One benchmark case: accel (``baseline``) against each of ``peers``.

    ``builder(**params)`` must be a module-level function (the memory worker re-imports it by
    name) returning a :class:`Setup` whose ``impls`` contain ``baseline``, every peer and every
    ``aux`` name. ``aux`` implementations are timed in the same rounds but not compared (e.g. a
    ``copy_`` of the same bytes, the bandwidth yardstick).
    """

    op: str
    group: str
    name: str
    mode: str  # "fwd" or "fwd+bwd"
    builder: Callable[..., Setup]
    params: dict
    baseline: str = "accel"
    peers: Tuple[str, ...] = ()
    aux: Tuple[str, ...] = ()
    # outputs of these peers are compared with the baseline's (relative max abs difference)
    check: Tuple[str, ...] = ()
    tol: float = 1e-4
    # bandwidth: bytes an ideal baseline kernel reads + writes, and the bytes the aux impl
    # ``bw_ref`` (a copy) reads + writes; both None when bandwidth is not reported for the case.
    # ``bw_ref=READ_BW`` instead compares with the machine's read bandwidth, for kernels bound by
    # reading: that of the aux impl ``READ_BW`` (a read-only reduction over ``bw_ref_bytes`` of
    # memory as cold as the kernel's, timed in the same rounds; median against median) when the case
    # has one, else the once-per-run measurement (:func:`read_bandwidth`).
    bw_bytes: Optional[int] = None
    bw_ref: Optional[str] = None
    bw_ref_bytes: Optional[int] = None
    # parameters of a small instance, used to warm up the memory worker
    warm_params: Optional[dict] = None
    note: str = ""

    @property
    def impl_names(self) -> Tuple[str, ...]:
        return (self.baseline,) + tuple(self.peers) + tuple(self.aux)


# --------------------------------------------------------------------------- read bandwidth

READ_BW = "read"  # Case.bw_ref value (and aux impl name): the machine's read bandwidth
READ_BW_BYTES = 512 * MiB
READ_BW_ROUNDS = 10
_READ_BW: Dict[str, dict] = {}


def read_bandwidth(device: str = "cpu") -> dict:
    """The machine's achievable read bandwidth, measured once per process and device.

    Read-only streams over a buffer far larger than the last-level cache (512 MiB on CPU, 2 GiB on
    CUDA), three reductions that only read it: ``buf.sum()``, ``amax`` over rows of 64 Ki floats,
    and a sum over rows of the same bytes viewed as bfloat16 (no single reduction reaches the
    memory's speed everywhere: fp32 ``sum`` is compute-bound on a few cores). Each is timed for 10
    rounds after a warm-up round; the fastest round of any gives the bandwidth (bytes / seconds).
    The best, not the median: the yardstick is what the machine can do, which only makes a
    kernel's fraction of it smaller.
    """
    key = "cuda" if device.startswith("cuda") else "cpu"
    if key in _READ_BW:
        return _READ_BW[key]
    nbytes = READ_BW_BYTES if key == "cpu" else 4 * READ_BW_BYTES
    n = nbytes // 4
    buf = torch.ones(n, dtype=torch.float32, device=device)  # written once: every page is resident
    rows, rows16 = buf.view(-1, 65536), buf.view(torch.bfloat16).view(-1, 131072)
    methods = (("sum", lambda: buf.sum()), ("amax_rows", lambda: rows.amax(1)),
               ("bf16_sum_rows", lambda: rows16.sum(1)))
    best = {}
    for name, fn in methods:
        fn()
        _sync(device)
        ts = []
        for _ in range(READ_BW_ROUNDS):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        best[name] = nbytes / min(ts) / 1e9
    del buf, rows, rows16
    gbps = max(best.values())
    res = {
        "GBps": gbps,
        "by_method_GBps": best,
        "bytes": nbytes,
        "method": (f"fastest of {READ_BW_ROUNDS} rounds of read-only reductions over a {nbytes // MiB} MiB buffer: "
                   f"fp32 sum, fp32 row amax, bf16 row sum ({torch.get_num_threads()} threads)"),
    }
    _READ_BW[key] = res
    return res


# --------------------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    *,
    warmup: int = 1,
    min_reps: int = 5,
    max_reps: int = 50,
    budget_s: float = 2.0,
    device: str = "cpu",
    keep_first: Sequence[str] = (),
    slow_round_s: Optional[float] = None,
    slow_reps: int = 3,
) -> Tuple[Dict[str, List[float]], Dict[str, object]]:
    """Time ``fns`` round-robin; return ``({name: [seconds per round]}, {name: first output})``.

    ``warmup`` rounds are run first (at least one; its outputs are returned for the names in
    ``keep_first``, for the correctness check). The number of timed rounds is ``budget_s``
    divided by the duration of the last warm-up round, clamped to ``[min_reps, max_reps]``;
    if that round took longer than ``slow_round_s``, only ``slow_reps`` rounds are timed (a cap
    on the run time of cases whose slowest peer takes many seconds per call).
    Each round rotates the starting implementation.
    """
    names = list(fns)
    n = len(names)
    first: Dict[str, object] = {}
    round_s = 0.0
    for w in range(max(1, warmup)):
        t_round = time.perf_counter()
        for i in range(n):
            name = names[(w + i) % n]
            out = fns[name]()
            if w == 0 and name in keep_first:
                first[name] = out
            del out
        _sync(device)
        round_s = time.perf_counter() - t_round
    reps = int(min(max_reps, max(min_reps, math.ceil(budget_s / max(round_s, 1e-9)))))
    if slow_round_s is not None and round_s > slow_round_s:
        reps = min(reps, slow_reps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(reps):
        for i in range(n):
            name = names[(r + i) % n]
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            del out
    return times, first


def _summary(ts: List[float]) -> dict:
    ms = [t * 1e3 for t in ts]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "runs": ms}


def _flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        res = []
        for o in out:
            res.extend(_flatten(o))
        return res
    return []


def compare_outputs(ref, other) -> dict:
    """Largest ``max|a - b| / max|a|`` over the tensors of two outputs (fp64 arithmetic)."""
    a_list, b_list = _flatten(ref), _flatten(other)
    if len(a_list) != len(b_list):
        return {"rel": float("inf"), "max_abs_diff": float("inf"), "error": "different number of outputs"}
    worst_rel, worst_abs = 0.0, 0.0
    for a, b in zip(a_list, b_list):
        if a is None or b is None:
            continue
        if a.shape != b.shape:
            return {"rel": float("inf"), "max_abs_diff": float("inf"),
                    "error": f"shape {tuple(a.shape)} vs {tuple(b.shape)}"}
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        diff = (a64 - b64).abs().max().item()
        scale = a64.abs().max().item()
        rel = diff / scale if scale > 0 else diff
        if not math.isfinite(diff):
            rel = float("inf")
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, diff)
    return {"rel": worst_rel, "max_abs_diff": worst_abs}


# --------------------------------------------------------------------------- memory

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

    def measure(self, case: Case, setup: Setup) -> Dict[str, Optional[int]]:
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


# --------------------------------------------------------------------------- running

def run_case(case: Case, args, meter: MemoryMeter) -> dict:
    device = case.params.get("device", "cpu")
    if not device.startswith("cuda"):
        # every case starts with accel's CPU buffer cache empty, so its result does not depend on the
        # sizes the cases before it left cached (the warm-up round refills it)
        empty_accel_cpu_cache()
    setup = case.builder(**case.params)
    t_case = time.perf_counter()
    budget = args.budget if args.budget is not None else (0.5 if args.size != "full" else 2.0)
    times, first = time_interleaved(
        setup.impls,
        warmup=args.warmup,
        min_reps=args.reps,
        max_reps=max(args.reps, args.max_reps),
        budget_s=budget,
        device=device,
        keep_first=(case.baseline,) + tuple(case.check),
        slow_round_s=args.slow_round,
        slow_reps=min(args.reps, 3),
    )
    check = {}
    for peer in case.check:
        c = compare_outputs(first[case.baseline], first[peer])
        c["tol"] = case.tol
        c["ok"] = bool(c["rel"] <= case.tol)
        check[peer] = c
    del first
    if setup.reset is not None:
        setup.reset()
    if device.startswith("cuda"):
        memory = meter.measure(case, setup)
        del setup
    else:
        del setup  # free the inputs before the worker allocates its own copy
        gc.collect()
        memory = meter.measure(case, None)

    cache = accel_cpu_cache_stats() if not device.startswith("cuda") else None
    stats = {name: _summary(ts) for name, ts in times.items()}
    base_ms = stats[case.baseline]["median"]
    ratios = {peer: stats[peer]["median"] / base_ms for peer in case.peers}
    bandwidth = None
    if case.bw_bytes is not None and case.bw_ref == READ_BW:
        accel_gbs = case.bw_bytes / (base_ms * 1e-3) / 1e9
        rb = read_bandwidth(device)
        bandwidth = {
            "accel_GBps": accel_gbs,
            "run_read_GBps": rb["GBps"],
            "fraction_of_run_read": accel_gbs / rb["GBps"],
            "accel_bytes": case.bw_bytes,
        }
        if READ_BW in stats and case.bw_ref_bytes:
            # the yardstick timed in the same rounds, median against median: this VM's read bandwidth
            # moves by up to 1.5x within minutes, in bursts, so a once-per-run figure or a fastest round
            # measures the machine's luck as much as the kernel; both are kept for reference
            read_gbs = case.bw_ref_bytes / (stats[READ_BW]["median"] * 1e-3) / 1e9
            read_best = case.bw_ref_bytes / (stats[READ_BW]["min"] * 1e-3) / 1e9
            bandwidth.update({
                "read_GBps": read_gbs,
                "fraction_of_read": accel_gbs / read_gbs,
                "read_best_GBps": read_best,
                "fraction_of_read_best": accel_gbs / read_best,
                "read_bytes": case.bw_ref_bytes,
                "method": ("accel: bytes / median time; read: a read-only reduction (fp32 row amax) over as many "
                           "bytes of memory not read since the previous round, median of the same rounds "
                           "(read_best: its fastest round); run_read: " + rb["method"]),
            })
        else:
            bandwidth.update({
                "read_GBps": rb["GBps"],
                "fraction_of_read": accel_gbs / rb["GBps"],
                "method": "accel: bytes / median time; read: " + rb["method"],
            })
    elif case.bw_bytes is not None and case.bw_ref is not None and case.bw_ref in stats:
        accel_gbs = case.bw_bytes / (base_ms * 1e-3) / 1e9
        # the copy's best round: the machine's achievable copy bandwidth (a conservative yardstick:
        # it can only make accel's fraction smaller than a median would)
        copy_gbs = case.bw_ref_bytes / (stats[case.bw_ref]["min"] * 1e-3) / 1e9
        bandwidth = {
            "accel_GBps": accel_gbs,
            "copy_GBps": copy_gbs,
            "fraction_of_copy": accel_gbs / copy_gbs,
            "accel_bytes": case.bw_bytes,
            "copy_bytes": case.bw_ref_bytes,
            "method": "accel: bytes / median time; copy: bytes / fastest round",
        }
    return {
        "op": case.op,
        "group": case.group,
        "case": case.name,
        "mode": case.mode,
        "params": {k: v for k, v in case.params.items()},
        "baseline": case.baseline,
        "peers": list(case.peers),
        "times_ms": stats,
        "ratios": ratios,
        "memory_bytes": memory,
        "bandwidth": bandwidth,
        "check": check,
        "note": case.note,
        "rounds": len(times[case.baseline]),
        # accel's CPU output-buffer cache in the timing process after the case (bytes held free for
        # reuse, hits/misses so far): accel's timings include its reuse; the peers allocate as usual
        "accel_cpu_cache": cache,
        "case_wall_s": time.perf_counter() - t_case,
    }


# --------------------------------------------------------------------------- reporting

def _fmt_ms(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_mib(v: Optional[int]) -> str:
    return "-" if v is None else f"{v / MiB:.1f}"


COLUMNS = [("case", 24), ("mode", 7), ("peer", 16), ("accel ms", 9), ("peer ms", 9),
           ("peer/accel", 10), ("accel MiB", 9), ("peer MiB", 9), ("accel GB/s (% copy)", 19), ("check", 10)]


BW_LABEL_READ = "accel GB/s (% read)"


def table_header(group: str, mem_method: str, bw_label: Optional[str] = None) -> str:
    """The group's title and column names; ``bw_label`` renames the bandwidth column (e.g. % read)."""
    cols = COLUMNS if bw_label is None else [(bw_label if n == COLUMNS[8][0] else n, w) for n, w in COLUMNS]
    head = " | ".join(f"{name:<{w}}" if i < 3 else f"{name:>{w}}" for i, (name, w) in enumerate(cols))
    lines = [
        "",
        f"== {group} ==",
        f"   ratio = peer median / accel median (> 1: accel faster); memory = {mem_method}",
        head,
        "-" * len(head),
    ]
    return "\n".join(lines)


def table_rows(res: dict) -> List[str]:
    rows = []
    base = res["times_ms"][res["baseline"]]["median"]
    bw = res["bandwidth"]
    frac = None if bw is None else bw.get("fraction_of_copy", bw.get("fraction_of_read"))
    bw_s = "-" if bw is None else f"{bw['accel_GBps']:.1f} ({100 * frac:.0f}%)"
    for i, peer in enumerate(res["peers"]):
        c = res["check"].get(peer)
        chk = "-" if c is None else ("ok" if c["ok"] else f"DIFF {c['rel']:.1e}")
        if i == 0 and res.get("rounds_capped"):
            chk = f"{chk} n={res['rounds']}"
        cells = [
            res["case"] if i == 0 else "", res["mode"] if i == 0 else "", peer,
            _fmt_ms(base) if i == 0 else "", _fmt_ms(res["times_ms"][peer]["median"]),
            f"{res['ratios'][peer]:.2f}x", _fmt_mib(res["memory_bytes"].get(res["baseline"])) if i == 0 else "",
            _fmt_mib(res["memory_bytes"].get(peer)), bw_s if i == 0 else "", chk,
        ]
        rows.append(" | ".join(f"{c:<{w}}" if j < 3 else f"{c:>{w}}" for j, (c, (_, w)) in enumerate(zip(cells, COLUMNS))))
    return rows


def summary_lines(results: List[dict]) -> List[str]:
    lines = ["", "== summary: peer/accel ratios (geometric mean, min, max over cases) =="]
    groups: Dict[Tuple[str, str, str], List[float]] = {}
    for r in results:
        for peer, ratio in r["ratios"].items():
            groups.setdefault((r["group"], r["mode"], peer), []).append(ratio)
    for (group, mode, peer), rs in groups.items():
        gm = math.exp(sum(math.log(x) for x in rs) / len(rs))
        lines.append(f"  {group:<34} {mode:<8} vs {peer:<16} {gm:6.2f}x   [{min(rs):.2f}x .. {max(rs):.2f}x]  "
                     f"({len(rs)} cases)")
    bws = [r["bandwidth"]["fraction_of_copy"] for r in results
           if r.get("bandwidth") and "fraction_of_copy" in r["bandwidth"]]
    if bws:
        lines.append(f"  accel bandwidth (median time) / copy bandwidth (fastest copy_ round), depthwise fwd: median {100 * statistics.median(bws):.0f}%, "
                     f"min {100 * min(bws):.0f}%, max {100 * max(bws):.0f}%")
    reads = [r for r in results if r.get("bandwidth") and "fraction_of_read" in r["bandwidth"]]
    if reads:
        def one(r):
            bw = r["bandwidth"]
            if "read_bytes" in bw:  # a yardstick timed in the case's rounds
                return (f"{r['case']} {r['mode']} {100 * bw['fraction_of_read']:.0f}% of {bw['read_GBps']:.1f} GB/s "
                        f"(of its fastest round {100 * bw['fraction_of_read_best']:.0f}%, "
                        f"of the run's {100 * bw['fraction_of_run_read']:.0f}%)")
            return f"{r['case']} {r['mode']} {100 * bw['fraction_of_read']:.0f}% of {bw['read_GBps']:.1f} GB/s"
        lines.append("  accel bandwidth (bytes it must read / median time) / the machine's read bandwidth "
                     "(a read-only reduction of as many cold bytes timed in the case's rounds, median; in brackets "
                     f"against its fastest round and against the run's {reads[0]['bandwidth']['run_read_GBps']:.1f} "
                     "GB/s from the header): " + ", ".join(one(r) for r in reads))
    capped = [r for r in results if r.get("rounds_capped")]
    if capped:
        lines.append(f"  {len(capped)} case(s) timed with fewer rounds because one round is slow (marked n=...)")
    bad = [(r["case"], r["mode"], p) for r in results for p, c in r["check"].items() if not c["ok"]]
    if bad:
        lines.append(f"  OUTPUT MISMATCH in {len(bad)} case(s): " + ", ".join(f"{a} {b} vs {c}" for a, b, c in bad))
    return lines


def machine_info(device: str) -> dict:
    cpu_model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if cpu_model is None and line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                if not flags and line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
    except OSError:
        cpu_model = platform.processor() or None
    mem_total = mem_total_bytes()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16") if f in flags]
    data = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model,
        "cpu_flags": isa,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": mem_total,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        data["gpu"] = torch.cuda.get_device_name(0)
    try:
        import accel

        data["accel"] = accel.info(print_it=False)
    except Exception as e:  # keep benchmarking the peers' environment description even so
        data["accel"] = {"error": f"{type(e).__name__}: {e}"}
    return data


def _cpu_snapshot() -> Optional[Tuple[float, float, float]]:
    """(machine busy seconds, machine total seconds, this process + reaped children's CPU seconds)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        tck = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    t = os.times()
    total = sum(vals) / tck
    idle = (vals[3] + vals[4]) / tck
    return total - idle, total, t.user + t.system + t.children_user + t.children_system


def other_load(start, end) -> Optional[float]:
    """Fraction of the machine's CPU time used by *other* processes between two snapshots."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    busy = end[0] - start[0]
    own = end[2] - start[2]
    return max(0.0, min(1.0, (busy - own) / (end[1] - start[1])))


def format_machine(m: dict) -> str:
    a = m.get("accel", {})
    parts = [
        f"date {m['date']}",
        f"cpu {m['cpu_model']} ({m['usable_cpus']} usable of {m['logical_cpus']} logical; {' '.join(m['cpu_flags'])})",
        f"torch {m['torch']} threads {m['torch_threads']}",
        f"accel {a.get('accel', '?')} built={a.get('built', '?')} kernel_isa={a.get('kernel_isa', '?')}",
        f"device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
    ]
    return "machine: " + "; ".join(parts)


def save_plot(results: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    groups = []
    for r in results:
        if r["group"] not in groups:
            groups.append(r["group"])
    cmap = plt.get_cmap("tab10")
    for r in results:
        for peer, ratio in r["ratios"].items():
            labels.append(f"{r['case']} {r['mode']} vs {peer}")
            values.append(ratio)
            colors.append(cmap(groups.index(r["group"]) % 10))
    n = max(1, len(values))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.22 * n))
    ypos = list(range(n))[::-1]
    ax.barh(ypos, values, color=colors)
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, v in zip(ypos, values):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=6)
    ax.set_xlabel("peer time / accel time (log scale; > 1 means accel is faster)")
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=cmap(i % 10), label=g) for i, g in enumerate(groups)], fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m accel.bench",
        description="Time accel against its peers, interleaved in one process; print ratios (peer/accel).",
    )
    p.add_argument("ops", nargs="*", metavar="op", help=f"ops to run (default: all): {', '.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer cases and rounds (< 1 minute)")
    p.add_argument("--size", choices=SIZES, default=None, help="shape preset (default full; --quick = quick)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="element type (default float32)")
    p.add_argument("--json", metavar="PATH", help="write every number, the machine and the versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="save a bar chart of the ratios (PNG)")
    p.add_argument("--filter", metavar="TEXT", action="append",
                   help="run only cases whose 'group case mode' contains TEXT (repeat: any of them)")
    p.add_argument("--reps", type=int, default=None, help="minimum timed rounds per case (default 5, quick 3)")
    p.add_argument("--max-reps", type=int, default=30, help="maximum timed rounds per case (default 30)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per case (default 1)")
    p.add_argument("--slow-round", type=float, default=6.0, metavar="S",
                   help="time only 3 rounds when one round takes longer than S seconds (default 6; "
                        "0 disables the cap); such rows are marked in the table")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed rounds aimed at per case (default 2, quick 0.5); min/max reps win")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-mem", action="store_true", help="skip the memory measurement")
    p.add_argument("--extra-peers", action="store_true", help="also time optional peers (e.g. F.pad + conv1d)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.size is None:
        args.size = "quick" if args.quick else "full"
    args.quick = args.size != "full"
    if args.device is None:
        args.device = "cpu"
    if args.reps is None:
        args.reps = 5 if args.size == "full" else 3
    args.torch_dtype = DTYPES[args.dtype]
    args.dtype = str(args.torch_dtype).replace("torch.", "")
    return args


def collect_cases(args) -> List[Case]:
    names = args.ops or list(OPS)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise SystemExit(f"unknown op(s) {unknown}; known: {list(OPS)}")
    cases: List[Case] = []
    for name in names:
        try:
            mod = importlib.import_module(OPS[name])
        except ImportError as e:
            raise SystemExit(f"cannot benchmark {name!r}: {e}") from e
        cases.extend(mod.cases(args))
    if args.filter:
        cases = [c for c in cases if any(f in f"{c.group} {c.name} {c.mode}" for f in args.filter)]
    return cases


def _exit_on_sigterm() -> None:
    """SIGTERM (timeout, kill) raises SystemExit so the memory worker is shut down on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    cases = collect_cases(args)
    if args.list:
        for c in cases:
            print(f"{c.op:<6} {c.group:<34} {c.name:<28} {c.mode:<8} vs {', '.join(c.peers)}")
        return 0
    if not cases:
        print("no cases selected", file=sys.stderr)
        return 2
    if args.slow_round is not None and args.slow_round <= 0:
        args.slow_round = None
    machine = machine_info(args.device)
    print(format_machine(machine))
    print(f"size={args.size} dtype={args.dtype} device={args.device}: {len(cases)} cases, "
          f"warm-up {args.warmup} round(s), median of >= {args.reps} interleaved rounds")
    machine["loadavg_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    snap = _cpu_snapshot()
    time.sleep(0.5)
    busy_now = other_load(snap, _cpu_snapshot())
    machine["other_processes_cpu_fraction_at_start"] = busy_now
    if busy_now is not None and busy_now > 0.1:
        print(f"WARNING: the machine is not idle: other processes are using {100 * busy_now:.0f}% of its CPU "
              f"time; competing for the cores distorts the timings")
    if any(c.bw_ref == READ_BW and c.bw_bytes is not None for c in cases):
        rb = read_bandwidth(args.device)
        machine["read_bandwidth"] = rb
        print(f"read bandwidth: {rb['GBps']:.1f} GB/s ({rb['method']})")
    read_groups = {c.group for c in cases if c.bw_ref == READ_BW}
    meter = MemoryMeter(args.device, enabled=not args.no_mem)
    results: List[dict] = []
    _exit_on_sigterm()
    cpu_start = _cpu_snapshot()
    t_start = time.perf_counter()
    group = None
    try:
        for case in cases:
            if case.group != group:
                group = case.group
                print(table_header(group, meter.method, BW_LABEL_READ if group in read_groups else None), flush=True)
            res = run_case(case, args, meter)
            res["rounds_capped"] = res["rounds"] < args.reps
            results.append(res)
            for row in table_rows(res):
                print(row, flush=True)
            if res["rounds_capped"]:
                round_s = sum(t["median"] for t in res["times_ms"].values()) / 1e3
                print(f"   n={res['rounds']}: only {res['rounds']} timed rounds, one round takes {round_s:.1f} s "
                      f"(> --slow-round {args.slow_round:g} s)")
            if case.note and (len(results) < 2 or results[-2]["note"] != case.note):
                print(f"   note: {case.note}")
    finally:
        meter.close()
    elapsed = time.perf_counter() - t_start
    others = other_load(cpu_start, _cpu_snapshot())
    machine["other_processes_cpu_fraction"] = others
    for line in summary_lines(results):
        print(line)
    print(f"\n{len(results)} cases in {elapsed:.0f} s")
    cache = accel_cpu_cache_stats() if not args.device.startswith("cuda") else None
    machine["accel_cpu_cache_at_end"] = cache
    if cache:
        print(f"accel's CPU output-buffer cache at the end: {cache.get('cached_bytes', 0) / MiB:.0f} MiB held free "
              f"for reuse, {cache.get('hits', 0)} hits / {cache.get('misses', 0)} misses (ACCEL_CPU_CACHE_MB caps it)")
    if others is not None:
        print(f"other processes used {100 * others:.0f}% of the machine's CPU time during the run"
              + ("  <-- NOT an idle machine: treat these timings with suspicion" if others > 0.05 else ""))
    if args.json:
        payload = {
            "machine": machine,
            "args": {k: v for k, v in vars(args).items() if k != "torch_dtype"},
            "memory_method": meter.method,
            "timing_method": ("time.perf_counter around each call (torch.cuda.synchronize on CUDA); "
                              "implementations interleaved round-robin with a rotating start; "
                              "median over rounds after warm-up"),
            "elapsed_s": elapsed,
            "results": results,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        title = f"accel vs peers ({args.device}, {args.dtype}, {args.size}) — {machine['cpu_model']}, {machine['date'][:10]}"
        save_plot(results, args.plot, title)
        print(f"wrote {args.plot}")
    mismatches = sum(1 for r in results for c in r["check"].values() if not c["ok"])
    return 1 if mismatches else 0
