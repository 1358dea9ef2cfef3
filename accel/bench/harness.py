"""The benchmark harness behind ``python -m accel.bench``, one name space over its modules.

* :mod:`accel.bench.case`: :class:`Case` and :class:`Setup`, and the helpers case groups build with;
* :mod:`accel.bench.timing`: interleaved timing, the read-bandwidth yardstick, the output check and
  :func:`run_case`;
* :mod:`accel.bench.memory`: peak memory of one call (CUDA statistics; on CPU, peak RSS in a
  spawned worker);
* :mod:`accel.bench.report`: tables, summary, machine description, JSON and plot;
* :mod:`accel.bench.cli`: the options, the case groups the ops' capability records name, ``main``.

Adding an op: write ``accel/bench/<group>.py`` with ``cases(args) -> list[Case]`` (see
:mod:`accel.bench.conv`) and name the group in the op's capability record (``bench=``).
"""
from accel.bench.case import READ_BW, Case, Setup, backward_setup, element_size, no_grad_setup, tolerance
from accel.bench.cli import DTYPES, OPS, SIZES, build_parser, collect_cases, main, parse_args
from accel.bench.memory import (
    CPU_MEM_METHOD, CUDA_MEM_METHOD, MiB, MemoryMeter, accel_cpu_cache_stats, empty_accel_cpu_cache, mem_total_bytes,
)
from accel.bench.report import (
    BW_LABEL_READ, COLUMNS, format_machine, machine_info, other_load, save_plot, summary_lines, table_header,
    table_rows,
)
from accel.bench.timing import (
    READ_BW_BYTES, READ_BW_ROUNDS, compare_outputs, read_bandwidth, run_case, time_interleaved,
)

__all__ = [
    "BW_LABEL_READ", "COLUMNS", "CPU_MEM_METHOD", "CUDA_MEM_METHOD", "DTYPES", "MiB", "OPS", "READ_BW",
    "READ_BW_BYTES", "READ_BW_ROUNDS", "SIZES", "Case", "MemoryMeter", "Setup", "accel_cpu_cache_stats",
    "backward_setup", "build_parser", "collect_cases", "compare_outputs", "element_size", "empty_accel_cpu_cache",
    "format_machine", "machine_info", "main", "mem_total_bytes", "no_grad_setup", "other_load", "parse_args",
    "read_bandwidth", "run_case", "save_plot", "summary_lines", "table_header", "table_rows", "tolerance",
    "time_interleaved",
]
