"""``sliding_windows(model, window, hop)``: per-window inference of a "same"-padded 1-D CNN on overlapping
windows, computed by streaming (StreamiNNC-style reuse of the activations shared by successive windows).

A model trained on windows of ``window`` samples is usually run every ``hop`` samples on the newest window,
recomputing ``window / hop`` times every activation. Streaming the model (:func:`accel.streaming.stream`)
computes each activation once; the newest window's output is then the last ``window / stride`` streamed
outputs. Those equal per-window inference except near the window edges, where per-window inference sees
the zero ("same") padding and the stream sees the real neighbouring samples ("signal padding"). See
docs/streaming.md, section "Sliding windows".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from accel.streaming.model import stream

__all__ = ["sliding_windows", "SlidingWindows", "WindowDeviation", "nrmse"]


def nrmse(reference: Tensor, approx: Tensor) -> float:
    """Normalized root-mean-square error ``sqrt(mean((ref - approx)^2)) / (max(ref) - min(ref))``, the
    definition used by the StreamiNNC authors (esl-epfl/streaminnc, ``get_nrmse``). 0.0 when both are equal;
    ``inf`` when the reference is constant and they differ."""
    reference, approx = reference.double(), approx.double()
    rmse = (reference - approx).pow(2).mean().sqrt().item()
    span = (reference.max() - reference.min()).item()
    if span == 0.0:
        return 0.0 if rmse == 0.0 else math.inf
    return rmse / span


@dataclass
class WindowDeviation:
    """Deviation of the streamed window outputs from per-window inference over one test signal."""
    nrmse: float            # over all outputs of all compared windows (StreamiNNC's definition)
    nrmse_interior: float   # over the outputs at least `edge` samples from both window edges (0 up to rounding)
    max_abs: float          # largest absolute deviation, all outputs
    max_abs_interior: float  # largest absolute deviation away from the edges
    windows: int            # windows compared
    edge: int               # outputs at each window edge that may deviate (ceil((receptive_field - 1) / stride))
    edge_fraction: float    # 2 * edge / (window / stride), capped at 1: share of the outputs that may deviate
    latency: int            # input samples between the newest sample and the end of the returned window


class SlidingWindows:
    """The output of ``model`` on the newest window of ``window`` samples, updated every ``hop`` samples by
    streaming; build it with :func:`sliding_windows`.

    ``reset(batch_size)`` starts new streams. ``step(chunk)`` takes the next ``hop`` samples ``(B, C, hop)``
    and returns the model's output ``(B, C_out, window // stride)`` for the newest complete window (``head``
    applied to it when given), or ``None`` while fewer than ``window // stride`` outputs are available.
    The returned window covers input samples ``[window_start, window_start + window)`` counted from the reset
    (attribute ``window_start`` after each step, a multiple of ``hop``: the windows per-window inference
    would see every ``hop`` samples); it ends ``latency`` samples before the newest sample: the look-ahead
    of the "same" padding (``delay * stride``) rounded up to a multiple of ``hop``.
    """

    def __init__(self, model: nn.Module, window: int, hop: int, head: Optional[Callable[[Tensor], Tensor]] = None):
        self.model, self.window, self.hop, self.head = model, window, hop, head
        self.streaming = stream(model)
        self.stride = self.streaming.stride
        self.delay = self.streaming.delay
        self.receptive_field = self.streaming.receptive_field
        self.outputs = window // self.stride  # per-window output samples
        self.edge = math.ceil((self.receptive_field - 1) / self.stride)
        self._hop_out = max(1, hop // self.stride)  # output samples per hop
        self._keep = self.outputs + self._hop_out  # buffered output samples
        self._batch: Optional[int] = None
        self.reset()

    # -- streaming
    def reset(self, batch_size: int = 1) -> None:
        """Start new streams for ``batch_size`` signals (forgets every previous sample)."""
        self.streaming.reset(batch_size)
        self._batch = batch_size
        self._buf: Optional[Tensor] = None  # the last `_keep` streamed output samples
        self._emitted = 0  # streamed output samples since the reset (including the first `delay`)
        self._seen = 0     # input samples since the reset
        self.window_start: Optional[int] = None
        self.latency: Optional[int] = None

    @torch.no_grad()
    def step(self, chunk: Tensor) -> Optional[Tensor]:
        if chunk.dim() != 3 or chunk.shape[-1] != self.hop:
            raise ValueError(f"SlidingWindows.step: expected a (B, C, hop={self.hop}) chunk, got shape "
                             f"{list(chunk.shape)}")
        if chunk.shape[0] != self._batch:
            raise ValueError(f"SlidingWindows.step: chunk has batch size {chunk.shape[0]}, the streams were reset "
                             f"for {self._batch}; call reset({chunk.shape[0]})")
        y = self.streaming.step(chunk)
        self._seen += chunk.shape[-1]
        self._emitted += y.shape[-1]
        buf = y if self._buf is None else torch.cat([self._buf, y], -1)
        self._buf = buf[..., max(0, buf.shape[-1] - self._keep):]
        avail = self._emitted - self.delay  # offline output samples available (the stream's first `delay` precede them)
        end = avail // self._hop_out * self._hop_out  # the newest window ends on the hop grid
        if end < self.outputs:
            return None
        self.window_start = (end - self.outputs) * self.stride
        self.latency = self._seen - (self.window_start + self.window)
        n = self._buf.shape[-1] - (avail - end)
        out = self._buf[..., n - self.outputs:n]
        return self.head(out) if self.head is not None else out

    # -- reference
    @torch.no_grad()
    def per_window(self, x: Tensor, start: int) -> Tensor:
        """Per-window inference (the model on ``x[..., start:start + window]`` alone, zero padded)."""
        y = self.model(x[..., start:start + self.window])
        return self.head(y) if self.head is not None else y

    @torch.no_grad()
    def deviation(self, x: Tensor) -> WindowDeviation:
        """Stream the test signal ``x`` (B, C, L) hop by hop (after a reset) and compare every returned window
        output with per-window inference of the same window. The streams are left reset afterwards."""
        if x.dim() != 3:
            raise ValueError(f"SlidingWindows.deviation: x must be (B, C, L), got shape {list(x.shape)}")
        self.reset(x.shape[0])
        got, want = [], []
        for t in range(0, x.shape[-1] - self.hop + 1, self.hop):
            y = self.step(x[..., t:t + self.hop])
            if y is not None:
                got.append(y)
                want.append(self.per_window(x, self.window_start))
        latency = self.latency
        self.reset(x.shape[0])
        if not got:
            raise ValueError(f"SlidingWindows.deviation: the signal ({x.shape[-1]} samples) is too short for one "
                             f"window of {self.window} samples plus the latency")
        g, w = torch.stack(got), torch.stack(want)
        e = min(self.edge, self.outputs)
        timed = self.head is None  # with a head the outputs have no time axis to split at the edges
        if timed and self.outputs - 2 * e > 0:
            gi, wi = g[..., e:self.outputs - e], w[..., e:self.outputs - e]
            nrmse_i, max_i = nrmse(wi, gi), (wi - gi).abs().max().item()
        else:
            nrmse_i, max_i = math.nan, math.nan
        return WindowDeviation(nrmse=nrmse(w, g), nrmse_interior=nrmse_i, max_abs=(w - g).abs().max().item(),
                               max_abs_interior=max_i, windows=len(got), edge=e,
                               edge_fraction=min(1.0, 2 * e / self.outputs), latency=latency)

    def __repr__(self) -> str:
        return (f"SlidingWindows(window={self.window}, hop={self.hop}, stride={self.stride}, delay={self.delay}, "
                f"receptive_field={self.receptive_field}, edge={self.edge})")


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            return m.in_channels
    raise ValueError("sliding_windows(): cannot infer the input channels (no Conv1d in the model); pass in_channels=")


def sliding_windows(model: nn.Module, window: int, hop: int, *, head: Optional[Callable[[Tensor], Tensor]] = None,
                    in_channels: Optional[int] = None) -> SlidingWindows:
    """Per-window inference of ``model`` on windows of ``window`` samples every ``hop`` samples, by streaming.

    ``model`` maps ``(B, C, window)`` to a per-sample output ``(B, C_out, window // stride)`` (convolutions
    with "same"/symmetric zero padding, pooling with ``kernel_size == stride``; anything :func:`stream`
    accepts). A pooled/global output per window is supported through ``head``: a callable applied to the
    per-sample window output (e.g. ``lambda y: y.mean(-1)``), since :func:`stream` refuses global pooling.
    Requires ``window % hop == 0`` and ``hop % stride == 0`` (pooling aligned to the hop); raises
    ``ValueError`` otherwise. ``in_channels`` defaults to the first ``Conv1d``'s.
    """
    for name, v in (("window", window), ("hop", hop)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"sliding_windows(): {name} must be a positive int, got {v!r}")
    if window % hop:
        raise ValueError(f"sliding_windows(): window ({window}) must be a multiple of hop ({hop})")
    sw = SlidingWindows(model, window, hop, head)
    s = sw.stride
    if hop % s:
        raise ValueError(f"sliding_windows(): hop ({hop}) must be a multiple of the model's total stride ({s}: "
                         f"strides and pooling sizes multiplied), so that every window's pooling is aligned "
                         f"with the stream's")
    c = in_channels if in_channels is not None else _in_channels(model)
    p = next(iter(model.parameters()), None)
    probe = torch.zeros(1, c, window, dtype=p.dtype if p is not None else None,
                        device=p.device if p is not None else None)
    with torch.no_grad():
        y = model(probe)
    if not isinstance(y, Tensor) or y.dim() != 3 or y.shape[-1] != window // s:
        shape = list(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"sliding_windows(): the model must map (B, C, {window}) to a per-sample output "
                         f"(B, C_out, {window // s}) (window / stride, time last: 'same' padding), got {shape}")
    return sw
