"""What a benchmark case is: :class:`Case` (one comparison) and :class:`Setup` (its callables).

A case group (``accel/bench/<group>.py``) builds its inputs with the helpers here, so that every
group sets up forward and forward+backward timing, element sizes and tolerances the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

READ_BW = "read"  # Case.bw_ref value (and aux impl name): the machine's read bandwidth


@dataclass
class Setup:
    """What a case builder returns: zero-argument callables, each doing the timed work once.

    ``impls`` maps an implementation name to its callable; the callable's return value is used
    only by the correctness check (forward: the output; forward+backward: the gradients).
    ``reset`` (optional) drops state the callables leave behind (``.grad``), so a memory
    measurement does not start with the previous implementation's gradients alive.
    """

    impls: Dict[str, Callable[[], object]]
    reset: Optional[Callable[[], None]] = None


def no_grad_setup(fns: Dict[str, Callable[[], object]]) -> Setup:
    """A forward :class:`Setup`: each callable runs under ``torch.no_grad()``."""
    def wrap(f):
        def run():
            with torch.no_grad():
                return f()
        return run
    return Setup({name: wrap(f) for name, f in fns.items()})


def backward_setup(fns: Dict[str, Callable[[], torch.Tensor]], leaves: Sequence[torch.Tensor],
                   grad_out: torch.Tensor) -> Setup:
    """A forward+backward :class:`Setup`: ``leaves`` are made to require gradients, each callable's
    output is backpropagated with ``grad_out``, and the callable returns the gradients of ``leaves``
    (which ``reset`` clears)."""
    for t in leaves:
        t.requires_grad_(True)

    def reset():
        for t in leaves:
            t.grad = None

    def wrap(f):
        def run():
            reset()
            f().backward(grad_out)
            return tuple(t.grad for t in leaves)
        return run
    return Setup({name: wrap(f) for name, f in fns.items()}, reset=reset)


def element_size(dtype: str) -> int:
    """Bytes per element of the dtype named ``dtype`` (``"float32"``, ``"bfloat16"``, ...)."""
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def tolerance(dtype: str, mode: str, low_precision: float = 3e-2) -> float:
    """The relative difference a peer's output may show against accel's: ``low_precision`` for 16-bit
    dtypes, tight for float64, and looser for gradients (more accumulation) than for outputs."""
    if dtype in ("bfloat16", "float16"):
        return low_precision
    if dtype == "float64":
        return 1e-10
    return 1e-4 if mode == "fwd" else 1e-3


@dataclass
class Case:
    """One benchmark case: accel (``baseline``) against each of ``peers``.

    ``builder(**params)`` must be a module-level function (the memory worker re-imports it by
    name) returning a :class:`Setup` whose ``impls`` contain ``baseline``, every peer and every
    ``aux`` name. ``aux`` implementations are timed in the same rounds but not compared (e.g. a
    ``copy_`` of the same bytes, the bandwidth yardstick).
    """

    op: str
    group: str
    name: str
    mode: str  # "fwd" or "fwd+bwd"
    builder: Callable[..., Setup]
    params: dict
    baseline: str = "accel"
    peers: Tuple[str, ...] = ()
    aux: Tuple[str, ...] = ()
    # outputs of these peers are compared with the baseline's (relative max abs difference)
    check: Tuple[str, ...] = ()
    tol: float = 1e-4
    # bandwidth: bytes an ideal baseline kernel reads + writes, and the bytes the aux impl
    # ``bw_ref`` (a copy) reads + writes; both None when bandwidth is not reported for the case.
    # ``bw_ref=READ_BW`` instead compares with the machine's read bandwidth, for kernels bound by
    # reading: that of the aux impl ``READ_BW`` (a read-only reduction over ``bw_ref_bytes`` of
    # memory as cold as the kernel's, timed in the same rounds; median against median) when the case
    # has one, else the once-per-run measurement (:func:`accel.bench.timing.read_bandwidth`).
    bw_bytes: Optional[int] = None
    bw_ref: Optional[str] = None
    bw_ref_bytes: Optional[int] = None
    # parameters of a small instance, used to warm up the memory worker
    warm_params: Optional[dict] = None
    note: str = ""

    @property
    def impl_names(self) -> Tuple[str, ...]:
        return (self.baseline,) + tuple(self.peers) + tuple(self.aux)
