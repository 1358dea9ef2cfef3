"""PATNet's partial channel attention (PAT_ch) as a drop-in module."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from accel.ops.partial_conv2d import partial_conv2d, partial_conv2d_stats

__all__ = ["PATChannel"]


class _ChannelGate(nn.Module):
    """PATNet's ``SRM``, the gate of the untouched channels: a (1, 2) convolution across each
    channel's (mean, std), a BatchNorm and a hard sigmoid. Kept as a submodule so that the
    state_dict keys are PATNet's (``attn.cfc1.weight``, ``attn.bn.*``)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.cfc1 = nn.Conv2d(channels, channels, kernel_size=(1, 2), bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(channels, device=device, dtype=dtype)
        self.sigmoid = nn.Hardsigmoid()

    def gate(self, mean: Tensor, std: Tensor) -> Tensor:
        """``(B, C)`` gate from the ``(B, C)`` statistics (cfc1 on the interleaved pair, as the conv)."""
        z = F.linear(torch.stack((mean, std), dim=-1).flatten(1), self.cfc1.weight.flatten(1), self.cfc1.bias)
        if _batch_stats(self.bn):
            return F.hardsigmoid(self.bn(z[:, :, None, None]).flatten(1))
        a, c = _bn_eval(self.bn)  # the same affine map as the module's, without its per-call overhead
        return F.hardsigmoid(torch.addcmul(c, z, a))


def _batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalises with the batch's statistics this call (as nn.BatchNorm2d decides)."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _bn_eval(bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """``bn`` in eval mode as ``y = x * a + c`` per channel."""
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight
    c = -bn.running_mean * a
    if bn.bias is not None:
        c = c + bn.bias
    return a, c


def _bn_factor(bn: nn.BatchNorm2d) -> Optional[float]:
    """What ``nn.BatchNorm2d.forward`` would use as the running-average factor this call, counting
    the batch as it does; None when the running statistics are not updated."""
    if not (bn.training and bn.track_running_stats):
        return None
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def _norm_affine(bn: nn.BatchNorm2d, mean: Tensor, std: Tensor, g: Tensor, pixels: int) -> Tuple[Tensor, Tensor]:
    """``bn(x2 * g)`` as a per-plane ``x2 * scale + shift``, ``(B, C)`` each, without reading x2:
    its batch statistics follow from the planes' mean and std and the gate (train mode), or are the
    running ones (eval mode)."""
    if not _batch_stats(bn):
        a, t = _bn_eval(bn)
        return g * a, t.expand_as(g)
    if g.shape[0] * pixels <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{[g.shape[0], g.shape[1], pixels]}")
    gm = g * mean
    m = gm.mean(0)
    # within-plane variance (std is unbiased) plus the spread of the planes' means: no cancellation
    var = (g * g * std * std).mean(0) * ((pixels - 1) / pixels) + (gm - m).square().mean(0)
    factor = _bn_factor(bn)
    if factor is not None:
        with torch.no_grad():
            n = g.shape[0] * pixels
            bn.running_mean.lerp_(m.detach().to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_((var.detach() * (n / max(n - 1, 1))).to(bn.running_var.dtype), factor)
    rstd = torch.rsqrt(var + bn.eps)
    a = rstd if bn.weight is None else bn.weight * rstd
    t = -m * a if bn.bias is None else bn.bias - m * a
    return g * a, t.expand_as(g)


class PATChannel(nn.Module):
    """PATNet's PAT_ch mixer: a 3x3 convolution of the first ``dim_conv3`` channels; the other
    ``dim_untouched`` channels gated by a hard sigmoid of their per-channel mean and std (``attn``,
    PATNet's ``SRM``) and normalised (``norm``, a BatchNorm).

    Drop-in for PATNet's ``Partial_conv3(dim, n_div, ..., use_attn=True, channel_type='se')``: the
    same attributes and state_dict keys (``partial_conv3.weight``, ``attn.cfc1.weight``,
    ``attn.bn.*``, ``norm.*``), train and eval mode. Two native passes over the tensor: the
    statistics (:func:`accel.ops.partial_conv2d_stats`), then the convolution with the gate and the
    normalisation applied as one per-plane scale and shift (:func:`accel.ops.partial_conv2d`); the
    BatchNorms work on ``(B, C)`` values in between (in train mode the second one's batch statistics
    follow from the planes' statistics, so the gated tensor is never materialised).
    """

    def __init__(self, dim: int, n_div: int = 4, *, dim_conv: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        if dim_conv is None:
            if isinstance(n_div, bool) or not isinstance(n_div, int) or n_div < 1:
                raise ValueError(f"PATChannel: n_div must be an int >= 1, got {n_div!r}")
            dim_conv = dim // n_div
        if not 1 <= dim_conv < dim:
            raise ValueError(f"PATChannel: the convolved channels must be in [1, dim={dim}), got {dim_conv}")
        self.dim = dim
        self.dim_conv3 = dim_conv
        self.dim_untouched = dim - dim_conv
        self.partial_conv3 = nn.Conv2d(dim_conv, dim_conv, 3, 1, 1, bias=False, device=device, dtype=dtype)
        self.attn = _ChannelGate(self.dim_untouched, device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(self.dim_untouched, device=device, dtype=dtype)

    @classmethod
    def from_module(cls, module: nn.Module) -> "PATChannel":
        """The accel module for a PATNet ``Partial_conv3`` with ``channel_type='se'``, sharing its
        submodules (parameters and running statistics not copied)."""
        conv, attn, norm = (getattr(module, n, None) for n in ("partial_conv3", "attn", "norm"))
        cfc1, bn = getattr(attn, "cfc1", None), getattr(attn, "bn", None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(cfc1, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                and isinstance(norm, nn.BatchNorm2d)):
            raise TypeError(f"PATChannel.from_module: expected PATNet's Partial_conv3 with channel_type='se' "
                            f"(partial_conv3, attn.cfc1, attn.bn, norm), got {type(module).__name__}")
        cp, cu = module.dim_conv3, module.dim_untouched
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1 \
                or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or conv.in_channels != cp \
                or conv.out_channels != cp or cfc1.kernel_size != (1, 2) or cfc1.groups != 1 \
                or cfc1.stride != (1, 1) or cfc1.padding != (0, 0) or cfc1.dilation != (1, 1) \
                or cfc1.in_channels != cu or cfc1.out_channels != cu or bn.num_features != cu \
                or norm.num_features != cu:
            raise ValueError(f"PATChannel.from_module: unsupported layer shapes in {module}")
        new = cls(cp + cu, dim_conv=cp, device="meta")  # its own layers are dropped
        new.partial_conv3 = conv
        new.attn.cfc1, new.attn.bn = cfc1, bn
        new.norm = norm
        return new

    def forward(self, x: Tensor) -> Tensor:
        cp = self.dim_conv3
        if x.dim() == 4 and x.shape[1] != self.dim:
            raise ValueError(f"PATChannel: x must have dim={self.dim} channels, got shape {tuple(x.shape)}")
        mean, std = partial_conv2d_stats(x, dim_conv=cp)
        g = self.attn.gate(mean, std)
        scale, shift = _norm_affine(self.norm, mean, std, g, x.shape[2] * x.shape[3])
        conv = self.partial_conv3
        return partial_conv2d(x, conv.weight, conv.bias, dim_conv=cp, scale=scale, shift=shift)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dim_conv3={self.dim_conv3}"
