"""Compare the peer/accel ratios of two or more ``python -m accel.bench --json`` runs of two builds.

    python scripts/bench_compare.py before1.json before2.json -- after1.json after2.json

Runs of one build are merged by taking, per case and peer, the median ratio over its runs (run the
builds alternately on the same machine, so drift hits both). Prints, per case, the ratio of each
build and the change ``after / before - 1``, and the largest change; exits 1 when a change is beyond
``--tolerance`` (default 5%).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Dict, List, Tuple

Key = Tuple[str, str, str, str]  # group, case, mode, peer


def ratios(paths: List[str]) -> Tuple[Dict[Key, float], str]:
    runs: Dict[Key, List[float]] = {}
    cpu = ""
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = data.get("machine", {})
        cpu = machine.get("gpu") or machine.get("cpu_model") or cpu
        for res in data["results"]:
            for peer, ratio in (res.get("ratios") or {}).items():
                if ratio:
                    runs.setdefault((res["group"], res["case"], res["mode"], peer), []).append(float(ratio))
    return {k: statistics.median(v) for k, v in runs.items()}, cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="before runs, then '--', then after runs")
    p.add_argument("--tolerance", type=float, default=0.05)
    raw = sys.argv[1:] if argv is None else argv
    if "--" not in raw:
        p.error("separate the before and after runs with --")
    split = raw.index("--")
    args = p.parse_args([a for a in raw if a != "--"])
    before_files = [a for a in raw[:split] if not a.startswith("--")]
    after_files = [a for a in raw[split + 1:] if not a.startswith("--")]
    before, cpu = ratios(before_files)
    after, _ = ratios(after_files)
    print(f"device: {cpu}; before: {len(before_files)} run(s), after: {len(after_files)} run(s)")
    print(f"{'group':<40} {'case':<26} {'mode':<7} {'peer':<18} {'before':>7} {'after':>7} {'change':>7}")
    worst = 0.0
    for key in sorted(set(before) & set(after)):
        change = after[key] / before[key] - 1
        worst = max(worst, abs(change))
        flag = "  <--" if abs(change) > args.tolerance else ""
        print(f"{key[0][:40]:<40} {key[1][:26]:<26} {key[2]:<7} {key[3][:18]:<18} {before[key]:>6.2f}x "
              f"{after[key]:>6.2f}x {change:>+6.1%}{flag}")
    missing = sorted(set(before) ^ set(after))
    for key in missing:
        print(f"only in {'before' if key in before else 'after'}: {' / '.join(key)}")
    print(f"largest change: {worst:+.1%} (tolerance {args.tolerance:.0%})")
    return 0 if worst <= args.tolerance and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
