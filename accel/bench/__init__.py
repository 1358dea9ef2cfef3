"""Benchmarks: ``python -m accel.bench [op ...] [--quick] [--json out.json] [--plot out.png]``.

See :mod:`accel.bench.timing` for the method (interleaved timing, medians), :mod:`accel.bench.memory`
for the memory columns, :mod:`accel.bench.harness` for how the modules fit together, and
docs/benchmarks.md for how to run and read the tables.
"""
from accel.bench.case import Case, Setup
from accel.bench.cli import OPS, main
from accel.bench.timing import time_interleaved

__all__ = ["OPS", "Case", "Setup", "main", "time_interleaved"]
