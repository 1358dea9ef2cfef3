"""Reporting: the tables and summary printed by ``python -m accel.bench``, the machine's
description, the load of other processes, the JSON file and the bar chart."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
from typing import Dict, List, Optional, Tuple

import torch

from accel.bench.memory import MiB, mem_total_bytes

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


def cpu_snapshot() -> Optional[Tuple[float, float, float]]:
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



TIMING_METHOD = ("time.perf_counter around each call (torch.cuda.synchronize on CUDA); "
                 "implementations interleaved round-robin with a rotating start; "
                 "median over rounds after warm-up")


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_json(path: str, *, machine: dict, args, memory_method: str, elapsed: float, results: List[dict]) -> None:
    """Every number of the run, with the machine, the versions and the options."""
    payload = {
        "machine": machine,
        "args": {k: v for k, v in vars(args).items() if k != "torch_dtype"},
        "memory_method": memory_method,
        "timing_method": TIMING_METHOD,
        "elapsed_s": elapsed,
        "results": results,
    }
    _make_parent(path)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def write_plot(path: str, results: List[dict], args, machine: dict) -> None:
    """The bar chart of the run's ratios, titled with the options and the machine."""
    _make_parent(path)
    title = f"accel vs peers ({args.device}, {args.dtype}, {args.size}) — {machine['cpu_model']}, {machine['date'][:10]}"
    save_plot(results, path, title)
