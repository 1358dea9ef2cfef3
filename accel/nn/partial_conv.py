"""FasterNet's partial convolution as a drop-in module (timm's ``Partial_conv3``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from accel.ops.partial_conv2d import partial_conv2d

__all__ = ["PartialConv2d"]


class PartialConv2d(nn.Module):
    """A 3x3 convolution (stride 1, padding 1) of the first ``dim_conv3`` channels, the other
    ``dim_untouched`` passed through, computed by :func:`accel.ops.partial_conv2d` into one output.

    Drop-in for timm's ``Partial_conv3``: the same attributes (``dim_conv3``, ``dim_untouched``), the
    same ``partial_conv3`` submodule (an ``nn.Conv2d``, so ``partial_conv3.weight`` is the
    state_dict key) and both of its forward forms, which here give the same result: ``"split_cat"``
    and ``"slicing"`` (timm's inference form) both return a new tensor and leave the input intact.
    A ``partial_conv3.bias`` (from a folded BatchNorm) is used when present.
    """

    def __init__(self, dim: int, n_div: int = 4, forward: str = "split_cat", *, dim_conv: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        if forward not in ("split_cat", "slicing"):
            raise ValueError(f"PartialConv2d: forward must be 'split_cat' or 'slicing', got {forward!r}")
        if dim_conv is None:
            if isinstance(n_div, bool) or not isinstance(n_div, int) or n_div < 1:
                raise ValueError(f"PartialConv2d: n_div must be an int >= 1, got {n_div!r}")
            dim_conv = dim // n_div
        if not 1 <= dim_conv <= dim:
            raise ValueError(f"PartialConv2d: the convolved channels must be in [1, dim={dim}], got {dim_conv}")
        self.dim = dim
        self.dim_conv3 = dim_conv
        self.dim_untouched = dim - dim_conv
        self.forward_type = forward
        self.partial_conv3 = nn.Conv2d(dim_conv, dim_conv, 3, 1, 1, bias=False, device=device, dtype=dtype)

    @classmethod
    def from_module(cls, module: nn.Module) -> "PartialConv2d":
        """The accel module for a timm ``Partial_conv3`` (or anything with its attributes), sharing
        its ``partial_conv3`` convolution (parameters not copied)."""
        conv = getattr(module, "partial_conv3", None)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"PartialConv2d.from_module: expected a module with a partial_conv3 nn.Conv2d, got "
                            f"{type(module).__name__}")
        cp = module.dim_conv3
        if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) != \
                ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros") or conv.in_channels != cp or conv.out_channels != cp:
            raise ValueError(f"PartialConv2d.from_module: partial_conv3 must be a {cp}->{cp} 3x3 conv with stride 1, "
                             f"padding 1, no dilation or groups and zero padding, got {conv}")
        forward = "slicing" if getattr(module.forward, "__name__", "") == "forward_slicing" else "split_cat"
        new = cls(cp + module.dim_untouched, forward=forward, dim_conv=cp, device="meta")  # its own conv is dropped
        new.partial_conv3 = conv
        return new

    def forward(self, x: Tensor) -> Tensor:
        conv = self.partial_conv3
        return partial_conv2d(x, conv.weight, conv.bias, dim_conv=self.dim_conv3)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dim_conv3={self.dim_conv3}, forward={self.forward_type!r}"
