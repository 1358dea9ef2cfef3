"""Runtime pieces of a :class:`~accel.streaming.model.StreamingModel`: branch alignment, the input side of
temporal nodes, pooling across chunks, weight-normed convolutions."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import torch
from torch import Tensor, nn

from accel.nn.streaming_conv import StreamingConv1d

if TYPE_CHECKING:
    from accel.streaming.model import _Info  # noqa: F401

class _Join:
    """Aligns streams on the offline sample index: branch ``i`` starts at offline index ``s0s[i]``;
    the later-starting ones get zero samples in front, and samples wait until all branches have them."""

    def __init__(self, infos: List[_Info]):
        self.infos = infos
        self.s0 = min(i.s0 for i in infos)
        self.reset()

    def reset(self) -> None:
        self.buf: List[Optional[Tensor]] = [None] * len(self.infos)

    def push(self, chunks: List[Tensor]) -> List[Tensor]:
        for i, (c, info) in enumerate(zip(chunks, self.infos)):
            if self.buf[i] is None:
                shape = list(c.shape)
                shape[info.td] = info.s0 - self.s0
                self.buf[i] = torch.cat([c.new_zeros(shape), c], info.td)
            else:
                self.buf[i] = torch.cat([self.buf[i], c], info.td)
        m = min(b.shape[info.td] for b, info in zip(self.buf, self.infos))
        out = [b.narrow(info.td, 0, m) for b, info in zip(self.buf, self.infos)]
        self.buf = [b.narrow(info.td, m, b.shape[info.td] - m) for b, info in zip(self.buf, self.infos)]
        return out


class _Feed:
    """Input side of a temporal node (time last): ``prefix`` zeros at the start of the stream (window
    alignment) and the first ``masked`` samples (after the prefix) zeroed: they are junk, before the
    offline signal, where the offline model has its zero padding."""

    def __init__(self, prefix: int, masked: int):
        self.prefix, self.masked = prefix, masked
        self.reset()

    def reset(self) -> None:
        self.seen = 0

    def __call__(self, x: Tensor) -> Tensor:
        if self.seen == 0 and self.prefix:
            x = torch.cat([x.new_zeros(*x.shape[:-1], self.prefix), x], -1)
        h = x.shape[-1]
        if self.seen < self.masked and h:
            k = min(h, self.masked - self.seen)
            x = x.clone()
            x[..., :k] = 0
        self.seen += h
        return x


class _Pool:
    """MaxPool1d/AvgPool1d with kernel_size == stride: buffers the incomplete window."""

    def __init__(self, module: nn.Module, k: int):
        self.module, self.k = module, k
        self.reset()

    def reset(self) -> None:
        self.pending: Optional[Tensor] = None

    def __call__(self, x: Tensor) -> Tensor:
        buf = x if self.pending is None else torch.cat([self.pending, x], -1)
        n = buf.shape[-1] // self.k * self.k
        self.pending = buf[..., n:]
        if n == 0:
            return buf.new_empty(*buf.shape[:-1], 0)
        return self.module(buf[..., :n])


def _live_weight(conv: nn.Module):
    """For a convolution whose weight is computed from other parameters (``parametrizations.weight_norm``
    or the older ``utils.weight_norm`` hook), a function returning the current weight; else None."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(conv, "weight"):
        return lambda: conv.weight
    for hook in conv._forward_pre_hooks.values():
        if hasattr(hook, "compute_weight") and getattr(hook, "name", None) == "weight":
            return lambda: hook.compute_weight(conv)
    return None


class _Ctx:
    final = False  # True while StreamingModel.flush runs the graph


class _Refresh:
    """Before a reset, gives a weight-normed convolution's streaming module its current weight."""

    def __init__(self, sc: StreamingConv1d, live):
        self.sc, self.live = sc, live

    def reset(self) -> None:
        self.sc._parameters["weight"] = self.live()
