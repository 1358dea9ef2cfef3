"""What this accel build contains: ``python -m accel.info`` or ``accel.info()``."""
from __future__ import annotations

import platform
import sys

import torch

from accel import _ext

_DEVICES = ("cpu", "cuda")


def kernel_table() -> dict:
    """Per op, from its capability record: the devices with kernels in this build, dtypes and limits."""
    from accel.ops import capabilities
    from accel.ops._capability import dtypes_text, gpu_has_kernel_image

    gpu = None
    if torch.cuda.is_available() and _ext.build_info()["cuda"]:
        gpu = gpu_has_kernel_image()
    table = {}
    for name, cap in capabilities().items():
        row = {"summary": cap.summary, "functions": list(cap.functions), "limits": dict(cap.limits)}
        for dev in _DEVICES:
            row[dev] = cap.has_kernels(dev)
            row[f"{dev}_dtypes"] = dtypes_text(cap.dtypes.get(dev, ()))
        row["cuda_min_arch"] = {dtypes_text([d]): f"{a // 10}.{a % 10}" for d, a in cap.cuda_min_arch.items()}
        if gpu is not None and row["cuda"]:
            reasons = {cap.unsupported_reason(torch.device("cuda"), d) for d in cap.dtypes.get("cuda", ())} - {None}
            row["gpu"] = "; ".join(sorted(reasons)) or "ok"
        table[name] = row
    data_gpu = None if gpu is None else {"runs": gpu[0], "detail": gpu[1]}
    return {"ops": table, "gpu_kernel_image": data_gpu}


def _kernels() -> dict:
    table = kernel_table()
    return {"kernels": table["ops"], "gpu_kernel_image": table["gpu_kernel_image"]}


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
            **_kernels(),
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
    cuda_built = bool(data.get("built_with_cuda"))
    if not cuda_built:
        lines.append("CUDA kernels: absent (a CPU-only build; rebuild with ACCEL_CUDA=1 for them)")
    image = data.get("gpu_kernel_image")
    if image is not None:
        lines.append(("GPU: " if image["runs"] else "WARNING: this GPU cannot run accel's CUDA kernels: ")
                     + image["detail"])
    lines.append(f"{'op':<20} {'cpu':<20} cuda")
    for op, row in data["kernels"].items():
        cpu = row["cpu_dtypes"] if row["cpu"] else "no kernels"
        cuda = row["cuda_dtypes"] if row["cuda"] else "absent" if not cuda_built else "no kernels"
        if row["cuda"] and row["cuda_min_arch"]:
            cuda += " (" + ", ".join(f"{d} >= sm {a}" for d, a in row["cuda_min_arch"].items()) + ")"
        lines.append(f"{op:<20} {cpu:<20} {cuda}")
        lines.extend(f"{'':<22}{k}: {v}" for k, v in row["limits"].items())
        if row.get("gpu", "ok") != "ok":
            lines.append(f"{'':<20} WARNING on this GPU: {row['gpu']}")
    return "\n".join(lines)

if __name__ == "__main__":
    info()
