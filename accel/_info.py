"""What this accel build contains: ``python -m accel.info`` or ``accel.info()``."""
from __future__ import annotations

import platform
import sys

import torch

from accel import _ext

# op name -> the registered ops that make it up (forward first)
OPS = {
    "dilated_conv1d": ("dilated_conv1d", "dilated_conv1d_backward"),
    "sigmoid_attention": ("sigmoid_attention_fwd", "sigmoid_attention_bwd"),
    "fused_moe": ("fused_moe_fwd", "fused_moe_bwd", "moe_route", "moe_route_backward"),
}

_DEVICES = ("CPU", "CUDA")


def kernel_table() -> dict:
    """For every op: which devices have a registered kernel for all of its registered ops."""
    table = {}
    for op, names in OPS.items():
        row = {}
        for dev in _DEVICES:
            row[dev.lower()] = all(
                torch._C._dispatch_has_kernel_for_dispatch_key(f"accel::{n}", dev) for n in names
            )
        table[op] = row
    return table


def info(print_it: bool = True) -> dict:
    """Versions, build configuration and the per-op kernel table. Prints a summary unless told not to."""
    import accel

    data = {
        "accel": accel.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if _ext.available():
        b = _ext.build_info()
        data.update({
            "built": True,
            "build_version": b["version"],
            "built_with_cuda": b["cuda"],
            "cuda_archs": b["cuda_archs"] or None,
            "built_against_torch": b["torch_compiled"],
            "kernel_isa": b["cpu_isa"],
            # run-time variants this CPU takes (AVX-512 paths, the MoE's bf16 tiles on AVX512-BF16, ...)
            "runtime_isa": " ".join(b.get("cpu_runtime_isa", [])) or "-",
            "kernels": kernel_table(),
        })
    else:
        data.update({"built": False, "build_error": str(_ext.load_error()), "kernels": {}})
    if print_it:
        print(format_info(data))
    return data


def format_info(data: dict) -> str:
    lines = ["accel build information", "-" * 23]
    keys = ["accel", "build_version", "python", "platform", "torch", "torch_cuda", "built_against_torch",
            "built_with_cuda", "cuda_archs", "cuda_available", "gpu", "cpu_capability", "kernel_isa", "runtime_isa", "threads"]
    for k in keys:
        if k in data:
            lines.append(f"{k:>20}: {data[k]}")
    if not data.get("built"):
        lines.append(f"{'build_error':>20}: {data.get('build_error')}")
        return "\n".join(lines)
    lines.append("")
    lines.append(f"{'op':<20} {'cpu':>5} {'cuda':>5}")
    for op, row in data["kernels"].items():
        lines.append(f"{op:<20} {'yes' if row['cpu'] else 'no':>5} {'yes' if row['cuda'] else 'no':>5}")
    return "\n".join(lines)


if __name__ == "__main__":
    info()
