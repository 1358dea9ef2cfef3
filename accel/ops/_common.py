"""Pieces shared by the ops' Python glue.

Argument validation lives in the native ops (``csrc/<op>/<op>.cpp``): a wrong dtype raises
TypeError, any other bad argument ValueError, each message naming the op, the argument, what was
expected and what was given. The wrappers only turn friendly arguments into the schema's, and the
fake kernels check only what they need to compute their outputs' shapes, with the same error types.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor


def tensor_arg(op: str, name: str, t) -> Tensor:
    """``t`` if it is a tensor; the wrappers read sizes before the native op could name the problem."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    return t


def int_arg(op: str, name: str, value) -> int:
    """An int argument of the schema: anything with ``__index__`` (a Python or NumPy int, a 0-d
    integer tensor, a SymInt), but not a bool or a float, which would be silently converted or
    refused with a dispatcher message that does not name the op; its range is checked natively."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {value!r}") from None


def size(t: Tensor, dim: int, default: int = 0) -> int:
    """``t.shape[dim]``, or ``default`` when ``t`` has too few dims: the native op then raises its
    error naming the expected layout."""
    return t.shape[dim] if -t.dim() <= dim < t.dim() else default


def fake_same_device(op: str, ref_name: str, ref: Tensor, **tensors: Optional[Tensor]) -> None:
    """The native device check, for the fake/meta kernel: a model whose weights were never
    materialised (meta) must not trace silently next to real activations."""
    for name, t in tensors.items():
        if t is not None:
            torch._check_value(t.device == ref.device,
                               lambda: f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                                       "they must be on the same device")


def fake_dims(op: str, **tensors) -> None:
    """``name=(tensor, dims, layout)``: the rank the fake kernel indexes, with the native message."""
    for name, (t, dims, layout) in tensors.items():
        torch._check_value(t.dim() == dims,
                           lambda: f"{op}: {name} must be {dims}-D {layout}, got shape {list(t.shape)}")


def fake_grad(t: Tensor, wanted: bool) -> Tensor:
    """A backward op's output: the gradient's shape when asked for, else the empty placeholder."""
    return t.new_empty(t.shape) if wanted else t.new_empty((0,))


def grads_for(need, grads, n_args: int) -> tuple:
    """An autograd formula's return: ``grads[i]`` where input ``i`` needs one, None elsewhere."""
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * (n_args - len(grads))
