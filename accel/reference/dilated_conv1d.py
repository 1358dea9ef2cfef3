"""Reference dilated 1-D convolution, in plain PyTorch (F.pad + F.conv1d)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dilated_conv1d"]


def _pads(padding, kernel_size: int, dilation: int):
    span = (kernel_size - 1) * dilation
    if padding == "causal":
        return span, 0
    if padding == "same":
        return span // 2, span - span // 2
    return int(padding), int(padding)


def dilated_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    dilation: int = 1,
    padding="causal",
    groups: int = 1,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    left, right = _pads(padding, weight.shape[-1], dilation)
    y = F.conv1d(F.pad(x, (left, right)), weight, bias, dilation=dilation, groups=groups)
    if activation == "relu":
        y = F.relu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    elif activation == "silu":
        y = F.silu(y)
    elif activation not in (None, "none"):
        raise ValueError(f"unknown activation {activation!r}")
    if residual is not None:
        y = y + residual
    return y
