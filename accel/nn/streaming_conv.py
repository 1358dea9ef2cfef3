"""StreamingConv1d: a 1-D convolution run over a stream of chunks, built on accel.ops.streaming_conv1d;
StreamingTCN: an accel.nn.TCN stepped in one call per chunk (accel.ops.streaming_conv1d_stack)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from accel.nn.dilated_conv import TCN, share_conv
from accel.ops.streaming_conv1d import _ring_index, streaming_conv1d, streaming_conv1d_stack

Padding = Union[str, int, Tuple[int]]


def _single(v, name: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(v) != 1:
            raise ValueError(f"StreamingConv1d: {name} must be an int or a 1-tuple, got {v!r}")
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"StreamingConv1d: {name} must be an int, got {v!r}")
    return v


def _padding_sides(padding: Padding, span: int) -> Tuple[int, int]:
    """``(left, right)`` zero padding of the offline convolution that ``padding`` names."""
    if isinstance(padding, str):
        if padding == "causal":
            return span, 0
        if padding == "same":  # as nn.Conv1d(padding="same"): the odd element on the right
            return span // 2, span - span // 2
        if padding == "valid":
            return 0, 0
        raise ValueError(f"StreamingConv1d: padding must be 'causal', 'same', 'valid' or an int, got {padding!r}")
    p = _single(padding, "padding")
    if p < 0:
        raise ValueError(f"StreamingConv1d: padding must be >= 0, got {p}")
    return p, p


class StreamingConv1d(nn.Module):
    """A 1-D convolution applied chunk by chunk to a stream, whose outputs, concatenated, are those of
    the offline convolution of the whole signal.

    Build it from an offline module with :meth:`from_module` (``nn.Conv1d`` or
    ``accel.nn.DilatedConv1d``; the parameters are shared, not copied) or with ``nn.Conv1d``'s
    arguments plus ``padding="causal"`` (the default here) and a fused ``activation``
    (``None``/``"relu"``/``"gelu"``/``"silu"``). ``weight`` and ``bias`` are the only entries of the
    ``state_dict``, under the same keys as ``nn.Conv1d``'s; the stream's history is the
    non-persistent buffer ``state``, ``(B, C_in, (K-1)*dilation)``.

    Usage::

        m = StreamingConv1d.from_module(conv)   # conv: offline nn.Conv1d / DilatedConv1d
        m.reset(batch_size)                     # zero history; also starts a new stream
        for chunk in chunks:                    # (B, C_in, h), any h >= 1, lengths may vary
            y = m.step(chunk)                   # (B, C_out, number of outputs due in the chunk)
        tail = m.flush()                        # the outputs that need the offline right padding

    **Delay.** A stream cannot look ahead. An offline convolution whose output ``n`` reads inputs
    after ``n * stride`` (zero padding on the right: ``padding="same"``, a symmetric int padding,
    ``"valid"``) looks ahead ``lookahead = (K-1)*dilation - left padding`` input samples; the
    streaming module computes each output as soon as its last input has arrived, so its outputs lag:
    step output sample ``j`` (counting from the last reset, over all chunks) equals offline output
    sample ``j - delay``, with ``delay = lookahead // stride`` output samples. The first ``delay``
    outputs of a stream correspond to no offline output (they read the zero history); the last
    ``delay`` offline outputs, which read the right zero padding, come from :meth:`flush`.
    Causal modules (``padding="causal"``, ``DilatedConv1d(padding="causal")``) have ``delay == 0``.
    A left padding larger than ``(K-1)*dilation`` (outputs made of padding alone) is refused.

    **Stride.** With ``stride = s > 1`` the module emits offline output ``n`` when input sample
    ``n*s + lookahead`` arrives, tracking the phase across chunks, so a chunk of ``h`` samples yields
    ``floor(h / s)`` or ``ceil(h / s)`` outputs (possibly none) and any chunking gives the same outputs.
    Cost: the native op has stride 1, so a chunk computes all ``h`` stride-1 outputs and keeps every
    ``s``-th (``s`` times the arithmetic of a strided kernel, plus a ``(B, C_out, h)`` temporary); the
    state update, the op's memory traffic on the history, is the same as at stride 1.

    **Reset.** :meth:`reset` allocates (or zeroes) the state in the weight's dtype and device for a
    batch of streams. :meth:`step` before any reset resets to the chunk's batch size, so a module is
    ready to stream as built; a later chunk with a different batch size is an error (call
    ``reset(new_batch_size)``: a stream's history belongs to its row).

    Gradients: with autograd on and ``weight`` (or the chunk) requiring grad, ``step``'s output is
    differentiable with respect to the chunk and the parameters within the chunk; the history is a
    constant (truncated back-propagation through time). Under ``torch.no_grad()`` the step is one
    native call.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Padding = "causal",
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        activation: Optional[str] = None,
    ):
        super().__init__()
        kernel_size = _single(kernel_size, "kernel_size")
        stride, dilation = _single(stride, "stride"), _single(dilation, "dilation")
        if padding_mode != "zeros":
            raise ValueError(f"StreamingConv1d supports padding_mode='zeros' only, got {padding_mode!r}: a "
                             f"{padding_mode} padding at the start needs samples the stream has not seen")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("kernel_size", kernel_size),
                        ("stride", stride), ("dilation", dilation), ("groups", groups)):
            if v < 1:
                raise ValueError(f"StreamingConv1d: {name} must be >= 1, got {v}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"StreamingConv1d: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if activation not in (None, "none", "relu", "gelu", "silu"):
            raise ValueError(f"StreamingConv1d: activation must be None, 'relu', 'gelu' or 'silu', got {activation!r}")
        span = (kernel_size - 1) * dilation
        left, right = _padding_sides(padding, span)
        if left > span:
            raise ValueError(f"StreamingConv1d: left padding {left} exceeds (K-1)*dilation = {span} (K={kernel_size}, "
                             f"dilation={dilation}): the first outputs would read padding only, before the stream "
                             f"starts")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding = padding if isinstance(padding, str) else _single(padding, "padding")
        self.activation = None if activation == "none" else activation
        self.right_padding = right
        self.lookahead = span - left          # input samples the offline output n reads beyond n*stride
        self.delay = self.lookahead // stride  # output samples by which the stream lags the offline outputs
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if str(device) != "meta":
            self._init_parameters()
        self.register_buffer("state", None, persistent=False)
        self._phase = 0  # input samples since the reset, modulo stride

    def _init_parameters(self) -> None:
        # nn.Conv1d's initialisation
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size
            bound = 1 / fan_in ** 0.5 if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_module(cls, conv: nn.Conv1d, activation: Optional[str] = None) -> "StreamingConv1d":
        """Stream an offline ``nn.Conv1d`` or ``accel.nn.DilatedConv1d``; the parameters are shared, not
        copied. ``activation`` defaults to the module's own fused one (``DilatedConv1d``) or none."""
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"StreamingConv1d.from_module expects an nn.Conv1d or DilatedConv1d, "
                            f"got {type(conv).__name__}")
        if activation is None:
            activation = getattr(conv, "activation", None)
        return share_conv(cls, conv, activation)

    @property
    def span(self) -> int:
        """``(K-1)*dilation``: the history a step needs, the length of the state."""
        return (self.kernel_size - 1) * self.dilation

    def reset(self, batch_size: int = 1) -> None:
        """Start ``batch_size`` new streams: a zero state in the weight's dtype and device (reused when
        its shape is unchanged), phase 0."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"StreamingConv1d.reset: batch_size must be an int >= 0, got {batch_size!r}")
        shape = (batch_size, self.in_channels, self.span)
        w = self.weight
        if self.state is not None and self.state.shape == shape and self.state.dtype == w.dtype \
                and self.state.device == w.device:
            self.state.zero_()
        else:
            self.state = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self._phase = 0

    def _check_chunk(self, chunk: Tensor, weight: Tensor) -> None:
        if not isinstance(chunk, Tensor):
            raise TypeError(f"StreamingConv1d.step: chunk must be a tensor, got {type(chunk).__name__}")
        if chunk.dim() not in (2, 3):
            raise ValueError(f"StreamingConv1d.step: chunk must be (B, C_in, h) or (C_in, h), got shape "
                             f"{list(chunk.shape)}")
        if chunk.shape[-2] != self.in_channels:
            raise ValueError(f"StreamingConv1d.step: chunk must have in_channels={self.in_channels} channels "
                             f"(dim -2), got shape {list(chunk.shape)}")
        if chunk.dtype != weight.dtype:
            raise TypeError(f"StreamingConv1d.step: chunk has dtype {chunk.dtype} but the weight has "
                            f"{weight.dtype}; convert one of them")
        if chunk.device != weight.device:
            raise ValueError(f"StreamingConv1d.step: chunk is on {chunk.device} but the weight is on {weight.device}")

    def step(self, chunk: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """Feed the next ``h`` samples of each stream, ``(B, C_in, h)`` (or ``(C_in, h)`` for one stream);
        return the outputs that became due, ``(B, C_out, n)``: ``n = h`` at stride 1, else the number of
        positions ``t`` in the chunk with ``t ≡ lookahead (mod stride)``. ``residual`` (shape of the
        output) is added after the activation, as ``DilatedConv1d``'s."""
        # the dicts, not Module.__getattr__: a decode step is a few microseconds of work
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        self._check_chunk(chunk, weight)
        unbatched = chunk.dim() == 2
        if unbatched:
            chunk = chunk.unsqueeze(0)
        state = self._buffers["state"]
        if state is None:
            self.reset(chunk.shape[0])
            state = self._buffers["state"]
        elif chunk.shape[0] != state.shape[0]:
            raise ValueError(f"StreamingConv1d.step: chunk has batch size {chunk.shape[0]} but the state holds "
                             f"{state.shape[0]} streams; call reset({chunk.shape[0]}) to start new streams")
        h = chunk.shape[-1]
        # input sample t of the stream completes offline output (t - lookahead) / stride
        first = (self.lookahead - self._phase) % self.stride
        if residual is not None:
            want = (chunk.shape[0], self.out_channels, len(range(first, h, self.stride)))
            if tuple(residual.shape) != (want[1:] if unbatched else want):
                raise ValueError(f"StreamingConv1d.step: residual must have the output's shape "
                                 f"{list(want[1:] if unbatched else want)}, got {list(residual.shape)}")
        y = streaming_conv1d(chunk, state, weight, bias, dilation=self.dilation, groups=self.groups,
                             activation=self.activation)
        if self.stride > 1:
            y = y[..., first::self.stride]
            self._phase = (self._phase + h) % self.stride
        if unbatched:
            y = y.squeeze(0)
        if residual is not None:
            y = y + residual if y.requires_grad or residual.requires_grad or self.stride > 1 else y.add_(residual)
        return y

    forward = step

    def flush(self) -> Tensor:
        """End the streams: feed the offline right zero padding (``right_padding`` samples) and return
        the outputs it completes, the offline outputs that read that padding. The stream's outputs since
        the reset, without their first ``delay`` samples and followed by these, are then exactly the
        offline outputs of the whole signal. Call :meth:`reset` before streaming again."""
        if self.state is None:
            raise RuntimeError("StreamingConv1d.flush: nothing was streamed since the module was built")
        zeros = self.state.new_zeros(self.state.shape[0], self.in_channels, self.right_padding)
        return self.step(zeros)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s + f", delay={self.delay}"


class StreamingTCN(nn.Module):
    """An ``accel.nn.TCN`` run over a stream of chunks (its layers are causal: delay 0), stepped in one
    native call per chunk (``accel.ops.streaming_conv1d_stack``), where a layer-by-layer step pays the
    Python and dispatcher cost of every layer. The TCN is held as a submodule (its parameters shared,
    not copied); every layer's state is a buffer ``state_<i>``, ``(B, channels, (K-1)*dilation_i)``.
    On the CPU the states are rings (``positions``, ``(B,)`` int64: see
    ``accel.ops.streaming_conv1d_stack``), so that a step writes only its new samples instead of
    moving every layer's whole history; elsewhere they are linear (``positions`` stays zero).
    Outputs equal the TCN's offline outputs on the whole signal."""

    def __init__(self, tcn: TCN):
        super().__init__()
        if not isinstance(tcn, TCN):
            raise TypeError(f"StreamingTCN expects an accel.nn.TCN, got {type(tcn).__name__}")
        self.tcn = tcn
        convs = list(tcn.layers)
        acts = {c.activation for c in convs}
        if len(acts) != 1:  # accel.nn.TCN builds every layer with the same activation
            raise ValueError(f"StreamingTCN: the layers must share one activation, got {sorted(map(str, acts))}")
        self.activation = acts.pop() or "none"
        self.residual = tcn.residual
        self.channels = tcn.channels
        self._dilations = [c.dilation[0] for c in convs]
        self._groups = [c.groups for c in convs]
        self._spans = [(c.kernel_size[0] - 1) * c.dilation[0] for c in convs]
        for i in range(len(convs)):
            self.register_buffer(f"state_{i}", None, persistent=False)
        self.register_buffer("positions", None, persistent=False)
        self._lists()

    def _lists(self) -> None:
        # plain lists of the parameters and states: a step reads them without nn.Module attribute
        # lookups (microseconds each); rebuilt whenever the module's tensors may have been replaced
        self._weights = [c.weight for c in self.tcn.layers]
        self._biases = [c.bias for c in self.tcn.layers]
        states = [self._buffers[f"state_{i}"] for i in range(len(self._spans))]
        self._states = states if all(s is not None for s in states) else []
        pos = self._buffers["positions"]
        if self._states and pos is not None and pos.device.type not in ("cpu", "meta") and bool(pos.any()):
            # rings arrive on a device that steps linear states: unroll them, oldest sample first
            with torch.no_grad():
                for s in self._states:
                    s.copy_(s.gather(2, _ring_index(pos, s)))
                pos.zero_()
        self._positions = pos if pos is not None and pos.device.type == "cpu" else None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._lists()
        return out

    @classmethod
    def from_module(cls, tcn: TCN) -> "StreamingTCN":
        """The same as ``StreamingTCN(tcn)``, named as the other modules' constructors from an offline one."""
        return cls(tcn)

    def reset(self, batch_size: int = 1) -> None:
        """Start ``batch_size`` new streams: every layer's state zero (reused when its shape is unchanged)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"StreamingTCN.reset: batch_size must be an int >= 0, got {batch_size!r}")
        w = self._weights[0]
        states = []
        for i, span in enumerate(self._spans):
            state = self._buffers[f"state_{i}"]
            if state is not None and state.shape == (batch_size, self.channels, span) and state.dtype == w.dtype \
                    and state.device == w.device:
                state.zero_()
            else:
                state = torch.zeros(batch_size, self.channels, span, dtype=w.dtype, device=w.device)
                self._buffers[f"state_{i}"] = state
            states.append(state)
        pos = self._buffers["positions"]
        if pos is not None and pos.shape == (batch_size,) and pos.device == w.device:
            pos.zero_()
        else:
            self._buffers["positions"] = torch.zeros(batch_size, dtype=torch.int64, device=w.device)
        self._lists()

    def step(self, chunk: Tensor) -> Tensor:
        """Feed the next ``h`` samples of each stream, ``(B, channels, h)`` (or ``(channels, h)``); return
        the TCN's outputs for them, same shape. (dtype, device and channel count are checked natively.)"""
        if not isinstance(chunk, Tensor) or chunk.dim() not in (2, 3):
            raise ValueError(f"StreamingTCN.step: chunk must be a (B, channels, h) or (channels, h) tensor, got "
                             f"{list(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__}")
        unbatched = chunk.dim() == 2
        if unbatched:
            chunk = chunk.unsqueeze(0)
        if not self._states:
            self.reset(chunk.shape[0])
        elif chunk.shape[0] != self._states[0].shape[0]:
            raise ValueError(f"StreamingTCN.step: chunk has batch size {chunk.shape[0]} but the states hold "
                             f"{self._states[0].shape[0]} streams; call reset({chunk.shape[0]}) to start new streams")
        if torch.is_grad_enabled():
            y = streaming_conv1d_stack(chunk, self._states, self._weights, self._biases, dilations=self._dilations,
                                       groups=self._groups, activation=self.activation, residual=self.residual,
                                       positions=self._positions)
        else:  # the arguments are already in the schema's form
            y = _stack_op(chunk, self._states, self._weights, self._biases, self._dilations, self._groups,
                          self.activation, self.residual, None, self._positions)
        return y.squeeze(0) if unbatched else y

    forward = step

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_layers={len(self._spans)}, residual={self.residual}"


_stack_op = torch.ops.accel.streaming_conv1d_stack.default
