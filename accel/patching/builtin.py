"""Rules that ship with accel itself (third-party model families come through plugins)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from accel.patching.rules import Rule

# Grouped convs with more input channels per group than this stay with nn.Conv1d.
MAX_CHANNELS_PER_GROUP = 16

# dtypes accel.ops.dilated_conv1d has kernels for (CPU: all four; CUDA: all four).
_CONV_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dispatch_key(device: torch.device) -> str:
    return {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device.type, device.type.upper())


def _has_kernel(op: str, device: torch.device) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, _dispatch_key(device))
    except RuntimeError:  # unknown dispatch key name for an exotic device
        return False


def extension_reason(op: str, device: torch.device) -> Optional[str]:
    """Why accel cannot run ``op`` on ``device`` here, or None. Imports accel._ext lazily."""
    from accel import _ext

    if not _ext.available():
        err = str(_ext.load_error()).strip().splitlines()
        return f"accel native extension not built: {err[0] if err else 'unknown error'}"
    if not _has_kernel(op, device):
        return f"accel._C has no kernel for device {device.type}"
    return None


def _conv1d_check(conv: nn.Module) -> Optional[str]:
    assert isinstance(conv, nn.Conv1d)
    if conv.stride[0] != 1:
        return f"stride {conv.stride[0]} != 1"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} is not zeros"
    if conv.dilation[0] == 1 and conv.groups != conv.in_channels:
        return "dense undilated conv: nn.Conv1d (oneDNN) is already the fastest kernel for it"
    per_group = conv.in_channels // conv.groups
    if conv.groups != conv.in_channels and per_group > MAX_CHANNELS_PER_GROUP:
        # measured (docs/benchmarks.md): accel's GEMM path is ~0.7x oneDNN for dense convs, and
        # its CUDA kernel has no tensor-core path; it wins for depthwise and narrow groups.
        return (f"{per_group} input channels per group > {MAX_CHANNELS_PER_GROUP}: nn.Conv1d's GEMM-based "
                "kernel is faster for wide groups")
    dtype = conv.weight.dtype
    if dtype not in _CONV_DTYPES:
        return f"dtype {str(dtype).replace('torch.', '')} has no accel kernel"
    if conv.bias is not None and conv.bias.dtype != dtype:
        return f"bias dtype {conv.bias.dtype} differs from weight dtype {dtype}"
    return extension_reason("accel::dilated_conv1d", conv.weight.device)


def _conv1d_build(conv: nn.Module) -> nn.Module:
    from accel.nn import DilatedConv1d  # lazy: importing accel.nn needs the native extension

    assert isinstance(conv, nn.Conv1d)
    return DilatedConv1d.from_module(conv)


CONV1D = Rule(
    name="conv1d->DilatedConv1d",
    op="dilated_conv1d",
    classes=(nn.Conv1d,),
    check=_conv1d_check,
    build=_conv1d_build,
    description="dilated or depthwise nn.Conv1d (stride 1, zero padding) -> accel.nn.DilatedConv1d",
)


def builtin_rules() -> List[Rule]:
    return [CONV1D]
