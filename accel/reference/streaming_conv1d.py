"""Reference streaming 1-D convolution, in plain PyTorch: concatenate the state and the chunk, convolve."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["streaming_conv1d", "streaming_conv1d_stack"]

_ACTIVATIONS = {None: lambda y: y, "none": lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


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
    span = (weight.shape[-1] - 1) * dilation
    rows = torch.arange(x.shape[0], device=x.device) if state_indices is None else state_indices.long()
    live = rows >= 0
    if x.shape[-1] == 0 or not bool(live.any()):  # nothing advances
        return x.new_zeros((x.shape[0], weight.shape[0], x.shape[-1]))
    slots = rows.clamp(min=0)
    full = torch.cat([state[slots], x], dim=-1)  # (B, C_in, L_s + h)
    y = F.conv1d(full[..., full.shape[-1] - x.shape[-1] - span:], weight, bias, dilation=dilation, groups=groups)
    y = torch.where(live[:, None, None], _ACTIVATIONS[activation](y), 0)
    with torch.no_grad():
        state[slots[live]] = full[live][..., x.shape[-1]:].to(state.dtype)
    return y


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
    n = len(states)
    biases = [None] * n if biases is None else biases
    groups = list(groups) if isinstance(groups, (list, tuple)) else [groups] * n
    # ring states (positions): rolled so that the oldest sample comes first, stepped, rolled back
    slots = range(len(positions)) if positions is not None else ()
    linear = list(states)
    if positions is not None:
        linear = [torch.stack([s[i].roll(-int(positions[i]) % max(s.shape[-1], 1), -1) for i in slots]) if len(slots)
                  else s.clone() for s in states]
    h = x
    for s, w, b, d, g in zip(linear, weights, biases, dilations, groups):
        y = streaming_conv1d(h, s, w, b, dilation=d, groups=g, activation=activation, state_indices=state_indices)
        h = y + h if residual else y
    if positions is not None:
        live = set(range(x.shape[0]) if state_indices is None else [int(i) for i in state_indices if int(i) >= 0])
        with torch.no_grad():
            for i in live:
                positions[i] += x.shape[-1]
            for s, lin in zip(states, linear):
                for i in slots:
                    s[i] = lin[i].roll(int(positions[i]) % max(s.shape[-1], 1), -1)
    return h
