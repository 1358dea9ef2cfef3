"""Capability records: what each op supports, declared once next to the op.

Every ``accel/ops/<op>.py`` defines ``CAPABILITY = Capability(...)``: the op's devices, dtypes per
device, limits, the CUDA compute capability its low-precision kernels need, and where its reference,
drop-in modules, benchmark case and doc page live. Patch rules, plugins, ``accel.info``, the benchmark
registry, ``scripts/gpu_sanitize.py`` and the tests read these records through :func:`capabilities`;
no other list of ops or dtypes is kept. Ops are found by listing the modules of ``accel.ops``.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Example:
    """One call of an op's public function on small, awkward inputs (odd sizes, options on).

    The registry tests run every example through the reference, ``torch.library.opcheck`` (on each
    registered op it reaches, forward and backward), ``torch.compile(fullgraph=True)`` and, in float64,
    ``gradcheck``; ``scripts/gpu_sanitize.py`` runs them under compute-sanitizer. Tensor arguments
    that should receive gradients have ``requires_grad`` set.
    """

    label: str
    fn: Callable[..., Any]
    args: Tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    reference: Optional[Callable[..., Any]] = None  # same signature as fn; None: the capability's reference

    def __call__(self):
        return self.fn(*self.args, **self.kwargs)


@dataclass(frozen=True)
class Capability:
    """What one op supports. ``name`` is the op's module in ``accel.ops`` (and ``accel.reference``)."""

    name: str
    summary: str
    functions: Tuple[str, ...]                      # public functions of accel.ops.<name>
    ops: Tuple[str, ...]                            # registered ops (accel::<op>), forward first
    dtypes: Mapping[str, Tuple[torch.dtype, ...]]   # device type -> dtypes with kernels
    examples: Callable[[torch.device, torch.dtype], List[Example]]
    modules: Tuple[str, ...] = ()                   # drop-in modules in accel.nn
    bench: str = ""                                 # case group of python -m accel.bench (accel.bench.<bench>)
    doc: str = ""                                   # the op's page, relative to the repository root
    limits: Mapping[str, str] = field(default_factory=dict)
    # dtype -> the lowest CUDA compute capability (major * 10 + minor) its kernels run on
    cuda_min_arch: Mapping[torch.dtype, int] = field(default_factory=dict)
    # larger and edge-case shapes (every head-dim bucket, multi-tile lengths, empty inputs, a full
    # cache) that scripts/gpu_sanitize.py runs under compute-sanitizer besides the examples
    sanitize_examples: Optional[Callable[[torch.device, torch.dtype], List[Example]]] = None

    def __post_init__(self) -> None:
        if not self.functions or not self.ops:
            raise ValueError(f"Capability {self.name!r}: functions and ops must not be empty")
        unknown = set(self.dtypes) - {"cpu", "cuda"}
        if unknown:
            raise ValueError(f"Capability {self.name!r}: unknown device types {sorted(unknown)}")

    @property
    def qualified_ops(self) -> Tuple[str, ...]:
        return tuple(f"accel::{op}" for op in self.ops)

    def has_kernels(self, device_type: str) -> bool:
        """Whether the loaded extension registered a kernel of every op of this record for the device type."""
        key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
        if key is None:
            return False
        def served(op: str) -> bool:  # a CompositeExplicitAutograd kernel serves every device
            return any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in (key, "CompositeExplicitAutograd"))

        try:
            return all(served(op) for op in self.qualified_ops)
        except RuntimeError:  # an op that is not registered at all
            return False

    def unsupported_reason(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """Why this op cannot run on ``device`` (in ``dtype``) with this build and machine, or None."""
        from accel import _ext

        if not _ext.available():
            err = str(_ext.load_error()).strip().splitlines()
            return f"accel native extension not built: {err[0] if err else 'unknown error'}"
        device = torch.device(device)
        if device.type == "meta":  # a model built on meta, patched before it is materialised
            all_dtypes = {d for dtypes in self.dtypes.values() for d in dtypes}
            if not self.has_kernels("meta"):
                return f"{self.name} has no meta (fake) kernels"
            if dtype is not None and dtype not in all_dtypes:
                return f"dtype {_dtype_name(dtype)} has no {self.name} kernel on any device"
            return None
        if device.type not in self.dtypes:
            return f"{self.name} has no kernels for device type {device.type}"
        if not self.has_kernels(device.type):
            return f"this accel build has no {device.type} kernels for {self.name}" + (
                " (built without CUDA)" if device.type == "cuda" and not _ext.build_info()["cuda"] else "")
        if dtype is not None and dtype not in self.dtypes[device.type]:
            return f"dtype {_dtype_name(dtype)} has no {self.name} kernel on {device.type}"
        if device.type == "cuda":
            return cuda_arch_reason(self, device, dtype)
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- CUDA architectures

def built_cuda_archs() -> Tuple[str, ...]:
    """The CUDA targets in the build: ``sm_XY`` (machine code) and ``compute_XY`` (PTX) names."""
    from accel import _ext

    if not _ext.available():
        return ()
    archs = _ext.build_info().get("cuda_archs") or ""
    return tuple(a for a in archs.replace(",", ";").split(";") if a)


def _arch_number(name: str) -> int:
    return int("".join(ch for ch in name.split("_", 1)[1] if ch.isdigit()))


def arch_runs_on(arch: str, capability: Tuple[int, int]) -> bool:
    """Whether code built for ``arch`` runs on a GPU of compute capability ``capability``.

    Machine code (``sm_XY``) runs on the same major version with an equal or higher minor, and
    arch-specific code (``sm_XYa``) on ``X.Y`` alone; PTX (``compute_XY``) is compiled by the driver
    for any GPU of capability ``X.Y`` or newer.
    """
    major, minor = divmod(_arch_number(arch), 10)
    if arch.endswith("a"):  # arch-specific machine code or PTX: that exact GPU generation only
        return tuple(capability) == (major, minor)
    if arch.startswith("compute_"):
        return tuple(capability) >= (major, minor)
    return capability[0] == major and capability[1] >= minor


def gpu_has_kernel_image(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """Whether the build holds code this GPU can run, and a sentence saying which."""
    cap = torch.cuda.get_device_capability(device)  # None or an index-less device: the current one
    archs = built_cuda_archs()
    usable = [a for a in archs if arch_runs_on(a, cap)]
    cc = f"{cap[0]}.{cap[1]}"
    if usable:
        return True, f"compute capability {cc}: runs {', '.join(usable)} from this build"
    return False, (f"compute capability {cc} has no kernel in this build (built for {', '.join(archs) or 'nothing'}); "
                   f"rebuild with ACCEL_CUDA_ARCHS including {cap[0]}{cap[1]}")


def cuda_arch_reason(cap: Capability, device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    ok, why = gpu_has_kernel_image(device)
    if not ok:
        return why
    need = cap.cuda_min_arch.get(dtype, 0) if dtype is not None else 0
    major, minor = torch.cuda.get_device_capability(device)
    if major * 10 + minor < need:
        return (f"{cap.name} {_dtype_name(dtype)} kernels need compute capability {need // 10}.{need % 10} or newer, "
                f"this GPU has {major}.{minor}")
    return None


# --------------------------------------------------------------------------- the registry

@functools.lru_cache(maxsize=None)
def _discover() -> Tuple[Capability, ...]:
    import accel.ops as ops_pkg

    found = []
    for info in sorted(pkgutil.iter_modules(ops_pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"accel.ops.{info.name}")
        cap = getattr(module, "CAPABILITY", None)
        if not isinstance(cap, Capability):
            raise TypeError(f"accel.ops.{info.name} must define CAPABILITY = accel.ops.Capability(...)")
        if cap.name != info.name:
            raise ValueError(f"accel.ops.{info.name}: CAPABILITY.name is {cap.name!r}, must be the module name")
        found.append(cap)
    return tuple(found)


def capabilities() -> Dict[str, Capability]:
    """Every op's capability record, by name (imports accel.ops, so it needs the native extension)."""
    return {cap.name: cap for cap in _discover()}


def capability(name: str) -> Capability:
    caps = capabilities()
    if name not in caps:
        raise KeyError(f"accel has no op {name!r}; ops: {', '.join(caps)}")
    return caps[name]


def public_functions() -> Dict[str, Callable[..., Any]]:
    """``accel.ops``' public functions, from the records."""
    out = {}
    for cap in _discover():
        module = importlib.import_module(f"accel.ops.{cap.name}")
        out.update({fn: getattr(module, fn) for fn in cap.functions})
    return out


def dtypes_text(dtypes: Sequence[torch.dtype]) -> str:
    short = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return "/".join(short.get(d, _dtype_name(d)) for d in dtypes)
