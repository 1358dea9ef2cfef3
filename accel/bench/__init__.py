"""Benchmarks: ``python -m accel.bench [op ...] [--quick] [--json out.json] [--plot out.png]``.

See :mod:`accel.bench.harness` for the method (interleaved timing, medians, memory) and
docs/benchmarks.md for how to run and read the tables.
"""
from accel.bench.harness import OPS, Case, Setup, main, time_interleaved

__all__ = ["OPS", "Case", "Setup", "main", "time_interleaved"]
