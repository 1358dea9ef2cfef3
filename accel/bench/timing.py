"""Timing: interleaved rounds, the read-bandwidth yardstick, the output check and :func:`run_case`.

Every case times accel and its peers **in the same process, interleaved**: after a warm-up, each
round calls every implementation once (A, B, C, then B, C, A, ...: the starting implementation
rotates so no implementation always follows the same one), and the reported time is the median
over rounds. Drift (thermal, frequency, a neighbour's load) therefore hits every implementation
alike, and the ratio ``peer / accel`` is what to read (``> 1`` means accel is faster).
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from accel.bench.case import READ_BW, Case
from accel.bench.memory import MiB, MemoryMeter, accel_cpu_cache_stats, empty_accel_cpu_cache


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


# --------------------------------------------------------------------------- read bandwidth

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


# --------------------------------------------------------------------------- running

def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _bandwidth(case: Case, stats: Dict[str, dict], device: str) -> Optional[dict]:
    """accel's bandwidth over ``case.bw_bytes`` against the case's yardstick, or None where it has none."""
    if case.bw_bytes is None:
        return None
    accel_gbs = _gbps(case.bw_bytes, stats[case.baseline]["median"])
    if case.bw_ref == READ_BW:
        rb = read_bandwidth(device)
        bandwidth = {
            "accel_GBps": accel_gbs,
            "run_read_GBps": rb["GBps"],
            "fraction_of_run_read": accel_gbs / rb["GBps"],
            "accel_bytes": case.bw_bytes,
        }
        if READ_BW in stats and case.bw_ref_bytes:
            # the yardstick timed in the same rounds, median against median: read bandwidth drifts
            # within minutes, so a once-per-run figure or a fastest round measures the machine's
            # luck as much as the kernel; both are kept for reference
            read_gbs = _gbps(case.bw_ref_bytes, stats[READ_BW]["median"])
            read_best = _gbps(case.bw_ref_bytes, stats[READ_BW]["min"])
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
        return bandwidth
    if case.bw_ref is None or case.bw_ref not in stats:
        return None
    # the copy's best round: the machine's achievable copy bandwidth (a conservative yardstick:
    # it can only make accel's fraction smaller than a median would)
    copy_gbs = _gbps(case.bw_ref_bytes, stats[case.bw_ref]["min"])
    return {
        "accel_GBps": accel_gbs,
        "copy_GBps": copy_gbs,
        "fraction_of_copy": accel_gbs / copy_gbs,
        "accel_bytes": case.bw_bytes,
        "copy_bytes": case.bw_ref_bytes,
        "method": "accel: bytes / median time; copy: bytes / fastest round",
    }


def run_case(case: Case, args, meter: MemoryMeter) -> dict:
    """Time one case (see the module docstring), check its outputs, measure its memory; the result
    row that the table, the summary and the JSON are made from."""
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
    bandwidth = _bandwidth(case, stats, device)
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

