"""Compare two builds of accel case by case, interleaved finely: speed before and after a change.

    python scripts/bench_ab.py --before /path/to/old/tree --after /path/to/new/tree conv attention moe \\
        [--size quick] [--threads 1] [--rounds 15] [--burst 0.25]

Two worker processes, one per build (its tree first on ``PYTHONPATH``), build the same
``accel.bench`` cases. For every case the driver asks them in turn, ``--rounds`` times (alternating
which goes first), to time a burst of calls of accel and of each peer (about ``--burst`` seconds).
Only one worker runs at a time and the two builds' bursts are seconds apart, so the machine's drift
reaches both alike. A process also has its own speed for a kernel (where the allocator put its
tensors: 4K aliasing between input and output, page placement), up to +-30% on a 2-core VM, so this
is repeated with ``--processes`` fresh pairs and each build's time is the median over the pairs of
the pair's median. The peers run the same code in both builds: their change is the noise floor.
Exits 1 when an accel change is beyond ``--tolerance`` (default 5%).

Each tree is imported as it is (no install): build its extension with ``python setup.py build_ext
--inplace`` (``ACCEL_CUDA=0`` for CPU cases). The cases' definitions must match in both trees.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List


def _worker() -> None:
    """Serve timing requests on stdin/stdout (one JSON object per line)."""
    import importlib

    import torch

    cfg = json.loads(sys.stdin.readline())
    torch.set_num_threads(cfg["threads"])
    args = argparse.Namespace(size=cfg["size"], device="cpu", dtype=cfg["dtype"], extra_peers=False, quick=False)
    cases = [c for op in cfg["ops"] for c in importlib.import_module(f"accel.bench.{op}").cases(args)]
    print(json.dumps([f"{c.group} | {c.name} | {c.mode}" for c in cases]), flush=True)
    built: Dict[int, object] = {}
    for line in sys.stdin:
        req = json.loads(line)
        i = req["case"]
        if req.get("drop"):
            built.pop(i, None)
            print("{}", flush=True)
            continue
        case = cases[i]
        names = [case.baseline, *case.peers]
        if i not in built:
            built[i] = case.builder(**case.params)
            for name in names:  # warm-up: allocator, packed weights, thread pool
                built[i].impls[name]()
        impls = built[i].impls
        out = {}
        for name in names:
            t_end, times = time.perf_counter() + req["burst"], []
            while not times or (time.perf_counter() < t_end and len(times) < 2000):
                t0 = time.perf_counter()
                impls[name]()
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times) * 1e3
        print(json.dumps(out), flush=True)


class _Worker:
    def __init__(self, tree: str, cfg: dict):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]))
        self.p = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        self.cases = self.ask(cfg)

    def ask(self, req: dict):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("a worker exited; run it by hand to see why")
        return json.loads(line)


def chosen(names: List[str], filters: List[str]) -> List[int]:
    return [i for i, n in enumerate(names) if not filters or any(f in n for f in filters)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ops", nargs="+")
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--size", default="quick")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--processes", type=int, default=6, help="pairs of worker processes, one after the other")
    p.add_argument("--rounds", type=int, default=4, help="turns per build per case, per pair of processes")
    p.add_argument("--burst", type=float, default=0.2, help="seconds of calls per implementation per turn")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--filter", action="append", default=[], help="only cases whose 'group | case | mode' contains "
                   "this text (repeat: any of them)")
    a = p.parse_args(argv)
    cfg = dict(ops=a.ops, size=a.size, dtype=a.dtype, threads=a.threads)
    # per_pair[case][build][impl] = that pair's median over its rounds
    per_pair: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
    names: List[str] = []
    for pp in range(a.processes):
        workers = {"before": _Worker(a.before, cfg), "after": _Worker(a.after, cfg)}
        names = workers["before"].cases
        if names != workers["after"].cases:
            raise SystemExit("the two builds define different cases for these ops")
        for i in chosen(names, a.filter):
            ms: Dict[str, Dict[str, List[float]]] = {"before": {}, "after": {}}
            for r in range(a.rounds):
                for build in (("before", "after") if (r + pp) % 2 == 0 else ("after", "before")):
                    for impl, t in workers[build].ask(dict(case=i, burst=a.burst)).items():
                        ms[build].setdefault(impl, []).append(t)
            for w in workers.values():
                w.ask(dict(case=i, drop=True))
            for build, d in ms.items():
                for impl, v in d.items():
                    per_pair.setdefault(i, {}).setdefault(build, {}).setdefault(impl, []).append(statistics.median(v))
        for w in workers.values():
            w.p.stdin.close()
            w.p.wait()
    print(f"# {a.threads} thread(s); {a.processes} pairs of processes x {a.rounds} rounds x {a.burst} s bursts per "
          "implementation; ms = median over the pairs of each pair's median; change = after / before - 1")
    worst = 0.0
    for i in chosen(names, a.filter):
        name = names[i]
        med = {b: {k: statistics.median(v) for k, v in d.items()} for b, d in per_pair[i].items()}
        parts = []
        for j, impl in enumerate(med["before"]):  # accel (the case's baseline) first, then the peers
            change = med["after"][impl] / med["before"][impl] - 1
            if j == 0:
                worst = max(worst, abs(change))
            parts.append(f"{impl} {med['before'][impl]:.3f} -> {med['after'][impl]:.3f} ms ({change:+.1%})")
        print(f"{name}: " + "; ".join(parts), flush=True)
    print(f"largest accel change: {worst:.1%} (tolerance {a.tolerance:.0%})")
    return 0 if worst <= a.tolerance else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        sys.exit(main())
