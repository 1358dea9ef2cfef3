"""Reference partial convolution (FasterNet's PConv), in plain PyTorch: split, conv2d, concatenate."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["partial_conv2d", "partial_conv2d_"]


def partial_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dim_conv: Optional[int] = None,
                   n_div: int = 4) -> Tensor:
    cp = dim_conv if dim_conv is not None else x.shape[1] // n_div
    x1, x2 = torch.split(x, [cp, x.shape[1] - cp], dim=1)
    return torch.cat((F.conv2d(x1, weight, bias, padding=1), x2), dim=1)


def partial_conv2d_(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dim_conv: Optional[int] = None,
                    n_div: int = 4) -> Tensor:
    cp = dim_conv if dim_conv is not None else x.shape[1] // n_div
    x[:, :cp] = F.conv2d(x[:, :cp], weight, bias, padding=1)
    return x

