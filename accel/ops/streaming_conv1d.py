"""Streaming 1-D convolution: one chunk of a stream through a convolution whose history is a state
tensor updated in place (the decode step of hybrid language models, a streaming TCN's layer), and
through a stack of them in one call (a TCN's step)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from accel import _ext
from accel.ops._capability import Capability, Example
from accel.ops._common import fake_dims, fake_same_device, int_arg, size, tensor_arg

_ext.load()

_NAME = "streaming_conv1d"
_NAME_STACK = "streaming_conv1d_stack"


def _examples(device: torch.device, dtype: torch.dtype):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    slots = torch.tensor([2, -1, 0], dtype=torch.int32, device=device)
    return [
        Example("depthwise decode h1 K4 silu, state K", streaming_conv1d, (t(3, 6, 1), t(3, 6, 4), t(6, 1, 4), t(6)),
                dict(groups=6, activation="silu")),
        Example("dense h7 K3 d5, no bias", streaming_conv1d, (t(2, 3, 7), t(2, 3, 10), t(5, 3, 3)),
                dict(dilation=5)),
        Example("grouped h13 K2 d3 gelu, slots with padding row", streaming_conv1d,
                (t(3, 4, 13), t(4, 4, 3), t(6, 2, 2), t(6)), dict(dilation=3, groups=2, activation="gelu",
                                                                    state_indices=slots)),
        Example("dense GEMM-shaped h37 C9->8 K3 d2 relu", streaming_conv1d, (t(2, 9, 37), t(2, 9, 4), t(8, 9, 3), t(8)),
                dict(dilation=2, activation="relu")),
        Example("stack of 3 depthwise h5 K3 d1,2,4 gelu, residual", streaming_conv1d_stack,
                (t(2, 6, 5), [t(2, 6, 2), t(2, 6, 4), t(2, 6, 9)], [t(6, 1, 3), t(6, 1, 3), t(6, 1, 3)],
                 [t(6), None, t(6)]),
                dict(dilations=(1, 2, 4), groups=6, activation="gelu", residual=True)),
        Example("stack of 2 depthwise ring states h3 K3 d1,4 silu, residual", streaming_conv1d_stack,
                (t(2, 5, 3), [t(2, 5, 2), t(2, 5, 8)], [t(5, 1, 3), t(5, 1, 3)], [t(5), t(5)]),
                dict(dilations=(1, 4), groups=5, activation="silu", residual=True,
                     positions=torch.tensor([3, 10], dtype=torch.int64, device=device))),
        Example("stack 4->5->3 dense h1, slots with padding row", streaming_conv1d_stack,
                (t(3, 4, 1), [t(4, 4, 2), t(4, 5, 3)], [t(5, 4, 3), t(3, 5, 2)], [t(5), t(3)]),
                dict(dilations=(1, 3), activation="silu", state_indices=slots)),
    ]


def _sanitize_examples(device: torch.device, dtype: torch.dtype):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    slots = torch.tensor([5, -1, 0, 7, 3], dtype=torch.int32, device=device)
    return [Example("depthwise C301 h1 K4 slots", streaming_conv1d, (t(5, 301, 1), t(8, 301, 3), t(301, 1, 4), t(301)),
                    dict(groups=301, activation="silu", state_indices=slots)),
            Example("dense C37->12 h257 K3 d64", streaming_conv1d, (t(2, 37, 257), t(2, 37, 128), t(12, 37, 3), None),
                    dict(dilation=64))]


_ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

CAPABILITY = Capability(
    name="streaming_conv1d",
    summary="one chunk of a stream through a dilated, grouped 1-D convolution; the state is updated in place",
    functions=("streaming_conv1d", "streaming_conv1d_stack"),
    ops=("streaming_conv1d", "streaming_conv1d_stack"),
    dtypes={"cpu": _ALL_FLOATS, "cuda": _ALL_FLOATS},
    examples=_examples,
    modules=("StreamingConv1d", "StreamingTCN"),
    bench="streaming",
    doc="docs/ops/streaming_conv1d.md",
    limits={"state": "(S, C_in, L_s) contiguous, L_s >= (K-1)*dilation",
            "state_indices": "int32 (B,), -1 marks a padding row; no slot twice",
            "positions": "int64 (S,) >= 0 (stack only): ring states"},
    sanitize_examples=_sanitize_examples,
)


def streaming_conv1d(
    x: Tensor,
    state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    dilation: int = 1,
    groups: int = 1,
    activation: Optional[str] = None,
    state_indices: Optional[Tensor] = None,
) -> Tensor:
    """Convolve the next chunk of each stream, continuing from its state, and advance the state.

    With ``s = state_indices[b]`` (``b`` when not given), ``P = (K-1)*dilation`` and
    ``u = cat(state[s], x[b])`` along time (length ``L_s + h``)::

        y[b, o, t] = act(bias[o] + sum_{i, k} weight[o, i, k] * u[g(o)*C_in/groups + i, L_s + t - (K-1-k)*dilation])
        state[s]  <- u[:, h:]                      (the last L_s samples)

    so chunks of any lengths give, concatenated, the causal convolution of the whole stream.
    ``u`` is never built: the kernels read the state and the chunk in place.

    Args:
        x: ``(B, C_in, h)``, a chunk of ``h >= 0`` new samples per row (any strides).
        state: ``(S, C_in, L_s)`` contiguous, same dtype and device; ``L_s >= (K-1)*dilation`` (a longer
            state, as transformers' caches keep, holds older samples that the convolution does not read).
            Updated in place.
        weight: ``(C_out, C_in / groups, K)``; bias: optional ``(C_out,)``.
        dilation: ``>= 1``; groups: divides ``C_in`` and ``C_out``.
        activation: ``None``, ``"relu"``, ``"gelu"`` (erf form) or ``"silu"``.
        state_indices: optional int32 ``(B,)``: the state slot of each row; ``-1`` marks a padding row,
            whose output is zero and which touches no state. A slot may appear once. On the CPU an index
            outside ``[-1, S)`` is an error (raised before anything is written); on CUDA, where reading the
            indices back would stall the stream, such a row is treated as padding.

    Returns:
        ``(B, C_out, h)`` in ``x``'s dtype (fp32 accumulation for bf16/fp16).

    The state is history, not a parameter: with autograd on, the output is differentiable with respect to
    ``x``, ``weight`` and ``bias`` (truncated back-propagation through time): the native op advances the
    state and the output is recomputed by ``accel.ops.dilated_conv1d`` on the rows' old history and the
    chunk. (``torch.ops.accel.streaming_conv1d`` itself has no backward and says so.)
    """
    x, state, weight = tensor_arg(_NAME, "x", x), tensor_arg(_NAME, "state", state), tensor_arg(_NAME, "weight", weight)
    dilation, groups = int_arg(_NAME, "dilation", dilation), int_arg(_NAME, "groups", groups)
    act = "none" if activation is None else activation
    if (torch.is_grad_enabled() and size(x, -1) > 0
            and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return _differentiable(x, state, weight, bias, dilation, groups, act, state_indices)
    return torch.ops.accel.streaming_conv1d(x, state, weight, bias, dilation, groups, act, state_indices)


def _differentiable(x, state, weight, bias, dilation, groups, act, state_indices):
    from accel.ops.dilated_conv1d import dilated_conv1d

    span = (size(weight, -1, 1) - 1) * dilation
    rows = torch.arange(size(x, 0), device=x.device) if state_indices is None else state_indices.long()
    # The history the rows read, gathered before the native op advances the state; indices are
    # clamped here only so the gather cannot fail before the native op names a bad one.
    if state.dim() == 3 and state.shape[0] > 0:
        history = state.detach().index_select(0, rows.clamp(0, state.shape[0] - 1))
        history = history[..., max(0, history.shape[-1] - span):]
    else:
        history = x.new_zeros((size(x, 0), size(x, 1), span))
    with torch.no_grad():  # checks every argument, then advances the state
        torch.ops.accel.streaming_conv1d(x.detach(), state, weight.detach(), None if bias is None else bias.detach(),
                                         dilation, groups, act, state_indices)
    y = dilated_conv1d(torch.cat([history, x], dim=-1), weight, bias, dilation=dilation, padding=0, groups=groups,
                       activation=None if act == "none" else act)
    return y if state_indices is None else torch.where((rows >= 0)[:, None, None], y, 0)


def streaming_conv1d_stack(
    x: Tensor,
    states: Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    dilations: Sequence[int],
    groups=1,
    activation: Optional[str] = None,
    residual: bool = False,
    state_indices: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> Tensor:
    """The chunk through layers ``i = 0 .. n-1`` of streaming convolutions, each as
    :func:`streaming_conv1d` with ``states[i]``, ``weights[i]``, ``biases[i]``, ``dilations[i]``,
    ``groups[i]`` (an int: the same for every layer) and the shared ``activation`` and
    ``state_indices``; with ``residual``, each layer's input is added to its output (after the
    activation; the channel count must then stay the same)::

        h = x;  h = streaming_conv1d(h, states[i], ...) (+ h)   for each layer;   return h

    One native call for the whole stack: a step of a deep, narrow network (a streaming TCN) pays
    the Python and dispatcher cost once rather than once per layer. Every layer's arguments are
    checked before any state is written. With autograd on, the layers are differentiated one by
    one, as :func:`streaming_conv1d` does.

    ``positions`` (``(S,)`` int64, updated in place) makes every state a ring: slot ``s`` of layer
    ``i`` holds its last ``L_s`` samples oldest first from sample ``positions[s] % L_s`` on,
    wrapping around; a step writes the newest samples over the oldest and adds ``h`` to
    ``positions[s]`` of each live row, instead of moving the whole history (the step of a deep
    TCN then touches only the samples its taps read). Zero positions and zero states start a stream.
    """
    x = tensor_arg(_NAME_STACK, "x", x)
    states, weights = list(states), list(weights)
    n = len(states)
    biases = [None] * n if biases is None else list(biases)
    dilations = [int_arg(_NAME_STACK, "dilations", d) for d in dilations]
    groups = [int_arg(_NAME_STACK, "groups", g) for g in groups] if isinstance(groups, (list, tuple)) \
        else [int_arg(_NAME_STACK, "groups", groups)] * n
    act = "none" if activation is None else activation
    if (torch.is_grad_enabled() and size(x, -1) > 0
            and any(t is not None and t.requires_grad for t in [x, *weights, *biases])):
        # checks every layer natively (the list lengths too: no state moves on an error), then
        # differentiates layer by layer
        with torch.no_grad():
            probe = [s.clone() for s in states]
            torch.ops.accel.streaming_conv1d_stack(x.detach(), probe, [w.detach() for w in weights],
                                                   [None if b is None else b.detach() for b in biases],
                                                   dilations, groups, act, residual, state_indices,
                                                   None if positions is None else positions.clone())
        linear = states if positions is None else [s.gather(2, _ring_index(positions, s)) for s in states]
        h = x
        for s, w, b, d, g in zip(linear, weights, biases, dilations, groups):
            y = _differentiable(h, s, w, b, d, g, act, state_indices)
            h = y + h if residual else y
        if positions is not None:
            with torch.no_grad():
                advanced = _advanced(positions, state_indices, size(x, -1))
                for s, lin in zip(states, linear):
                    s.scatter_(2, _ring_index(advanced, s), lin)
                positions.copy_(advanced)
        return h
    return torch.ops.accel.streaming_conv1d_stack(x, states, weights, biases, dilations, groups, act, residual,
                                                  state_indices, positions)


def _ring_index(positions: Tensor, state: Tensor) -> Tensor:
    """Gather index of ring states as linear ones: slot s's sample j at (positions[s] + j) % L_s."""
    S, C, L = state.shape
    j = torch.arange(L, device=positions.device)
    return ((positions[:, None] + j) % max(L, 1))[:, None, :].expand(S, C, L)


def _advanced(positions: Tensor, state_indices: Optional[Tensor], h: int) -> Tensor:
    """positions after a step of h samples: + h for the slots of live rows."""
    if state_indices is None:
        return positions + h
    idx = state_indices.long()
    return positions.clone().scatter_add_(0, idx.clamp(min=0), (idx >= 0).long() * h)


# ---------------------------------------------------------------- fake (meta) implementation

@torch.library.register_fake("accel::streaming_conv1d")
def _streaming_conv1d_fake(x, state, weight, bias, dilation, groups, activation, state_indices):
    fake_dims(_NAME, x=(x, 3, "(B, C_in, h)"), state=(state, 3, "(S, C_in, L_s)"),
              weight=(weight, 3, "(C_out, C_in / groups, K)"))
    fake_same_device(_NAME, "x", x, state=state, weight=weight, bias=bias, state_indices=state_indices)
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2]))  # writes state in place, as the schema declares


@torch.library.register_fake("accel::streaming_conv1d_stack")
def _streaming_conv1d_stack_fake(x, states, weights, biases, dilations, groups, activation, residual, state_indices,
                                 positions=None):
    torch._check_value(len(weights) >= 1, lambda: f"{_NAME_STACK}: states must hold at least one layer's state, got none")
    fake_dims(_NAME_STACK, x=(x, 3, "(B, C_in, h)"), weight=(weights[-1], 3, "(C_out, C_in / groups, K)"))
    fake_same_device(_NAME_STACK, "x", x, state_indices=state_indices, positions=positions,
                     **{f"states[{i}]": s for i, s in enumerate(states)},
                     **{f"weights[{i}]": w for i, w in enumerate(weights)})
    return x.new_empty((x.shape[0], weights[-1].shape[0], x.shape[2]))  # writes the states in place
