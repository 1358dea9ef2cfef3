"""The command line of ``python -m accel.bench``: options, the cases the ops' records name, the run."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Dict, List

import torch

from accel.bench.case import READ_BW, Case
from accel.bench.memory import MiB, MemoryMeter, accel_cpu_cache_stats
from accel.bench.report import (
    BW_LABEL_READ, cpu_snapshot, format_machine, machine_info, other_load, summary_lines, table_header, table_rows,
    write_json, write_plot,
)
from accel.bench.timing import read_bandwidth, run_case


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
    if not OPS:
        from accel import _ext

        _ext.load()  # raises the "not built" error that says how to build accel
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


def _describe_start(args, cases: List[Case]) -> dict:
    """Print the machine, the run's settings and the load other processes put on the machine now;
    measure the read bandwidth where a case is compared with it. Returns the machine's record."""
    machine = machine_info(args.device)
    print(format_machine(machine))
    print(f"size={args.size} dtype={args.dtype} device={args.device}: {len(cases)} cases, "
          f"warm-up {args.warmup} round(s), median of >= {args.reps} interleaved rounds")
    machine["loadavg_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    snap = cpu_snapshot()
    time.sleep(0.5)
    busy_now = other_load(snap, cpu_snapshot())
    machine["other_processes_cpu_fraction_at_start"] = busy_now
    if busy_now is not None and busy_now > 0.1:
        print(f"WARNING: the machine is not idle: other processes are using {100 * busy_now:.0f}% of its CPU "
              f"time; competing for the cores distorts the timings")
    if any(c.bw_ref == READ_BW and c.bw_bytes is not None for c in cases):
        rb = read_bandwidth(args.device)
        machine["read_bandwidth"] = rb
        print(f"read bandwidth: {rb['GBps']:.1f} GB/s ({rb['method']})")
    return machine


def _run_cases(cases: List[Case], args, meter: MemoryMeter) -> List[dict]:
    """Run the cases in order, printing each group's table as its rows come."""
    read_groups = {c.group for c in cases if c.bw_ref == READ_BW}
    results: List[dict] = []
    group = None
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
    return results


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
    machine = _describe_start(args, cases)
    meter = MemoryMeter(args.device, enabled=not args.no_mem)
    _exit_on_sigterm()
    cpu_start = cpu_snapshot()
    t_start = time.perf_counter()
    try:
        results = _run_cases(cases, args, meter)
    finally:
        meter.close()
    elapsed = time.perf_counter() - t_start
    others = other_load(cpu_start, cpu_snapshot())
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
        write_json(args.json, machine=machine, args=args, memory_method=meter.method, elapsed=elapsed,
                   results=results)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, results, args, machine)
        print(f"wrote {args.plot}")
    mismatches = sum(1 for r in results for c in r["check"].values() if not c["ok"])
    return 1 if mismatches else 0

