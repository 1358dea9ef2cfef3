"""Reference partial convolution (FasterNet's PConv, PATNet's PAT_ch pieces), in plain PyTorch:
split, conv2d, concatenate; torch.std / mean for the statistics."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["partial_conv2d", "partial_conv2d_", "partial_conv2d_stats", "PATChannelFormula"]


def _untouched(x2: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    if scale is not None:
        x2 = x2 * scale[:, :, None, None]
    if shift is not None:
        x2 = x2 + shift[:, :, None, None]
    return x2


def partial_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dim_conv: Optional[int] = None,
                   n_div: int = 4, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    cp = dim_conv if dim_conv is not None else x.shape[1] // n_div
    x1, x2 = torch.split(x, [cp, x.shape[1] - cp], dim=1)
    return torch.cat((F.conv2d(x1, weight, bias, padding=1), _untouched(x2, scale, shift)), dim=1)


def partial_conv2d_(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dim_conv: Optional[int] = None,
                    n_div: int = 4, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    cp = dim_conv if dim_conv is not None else x.shape[1] // n_div
    x[:, :cp] = F.conv2d(x[:, :cp], weight, bias, padding=1)
    x[:, cp:] = _untouched(x[:, cp:], scale, shift)
    return x


def partial_conv2d_stats(x: Tensor, *, dim_conv: Optional[int] = None, n_div: int = 4) -> Tuple[Tensor, Tensor]:
    cp = dim_conv if dim_conv is not None else x.shape[1] // n_div
    x2 = x[:, cp:].flatten(2)
    return x2.mean(-1), x2.std(-1)


class _GateFormula(nn.Module):
    """PATNet's SRM gate as its paper writes it: (mean, std) per channel -> (1, 2) conv ->
    BatchNorm -> hard sigmoid -> x * g."""

    def __init__(self, c: int):
        super().__init__()
        self.cfc1 = nn.Conv2d(c, c, kernel_size=(1, 2), bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.sigmoid = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        u = torch.cat([flat.mean(-1).view(b, c, 1, 1), flat.std(-1).view(b, c, 1, 1)], dim=-1)
        g = self.sigmoid(self.bn(self.cfc1(u)))
        return x * g.reshape(b, c, 1, 1).expand_as(x)


class PATChannelFormula(nn.Module):
    """PATNet's PAT_ch (``Partial_conv3`` with ``channel_type='se'``) in eager PyTorch: split, the
    3x3 conv of the first part, gate and BatchNorm of the rest, concatenate. Same attributes and
    state_dict keys as PATNet's module."""

    def __init__(self, dim: int, n_div: int):
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)
        self.attn = _GateFormula(self.dim_untouched)
        self.norm = nn.BatchNorm2d(self.dim_untouched)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), self.norm(self.attn(x2))), 1)
