"""Streaming convolution benchmark cases (``python -m accel.bench streaming``).

Groups:

1. ``decode step``: one new sample per stream (h = 1), depthwise, K 4, SiLU, a state of K-1
   samples per row: the convolution step of hybrid language models (Mamba, LFM2, Qwen3-Next) at
   decode time. ``accel.ops.streaming_conv1d(x, state, w, b, groups=C, activation="silu")`` against

   * ``transformers causal_conv1d_update``: transformers' torch fallback (what these models run on
     a CPU and wherever the causal-conv1d kernels are missing), re-implemented verbatim below
     (concatenate the state and the input, ``copy_`` the tail into the state, ``F.conv1d`` with
     ``groups=C``, slice, activation), so the case needs no transformers;
   * ``copy of state+weights``: a bandwidth yardstick, one ``copy_`` of as many bytes as the op
     must move at the least (the state read and written, the weight and bias read), so its ratio
     reads as the fraction of the copy bandwidth that accel reaches; the GB/s column gives the same
     against the copy's fastest round.

   As successive layers of a model would, calls cycle through independent copies of the state and
   of the weights (one per call, enough that one cycle exceeds the last-level cache), so that no call
   finds its state in cache; accel, the peer and the yardstick each cycle their own copies. Every
   implementation's first call (the output the check compares) starts from the same state.
2. ``streaming TCN``: ``accel.nn.TCN`` (10 layers, dilations 1..512, C 64, K 3, GELU + residual:
   receptive field W = 2047) streamed hop by hop with ``accel.nn.StreamingTCN`` (``.step(hop)``: one
   ``streaming_conv1d_stack`` call for the ten layers, as ``stream(tcn)`` runs it) against

   * ``recompute window``: the offline TCN (accel's kernels) on the last ``W + h - 1`` samples,
     keeping its last ``h`` outputs: what a stateless server does per hop;
   * ``torch cat+conv1d streaming``: the same stateful stream in plain PyTorch (per layer: concatenate
     the state and the hop, copy the tail into the state, ``F.conv1d``, GELU, residual).

   The linear limit, the recompute window's speed-up if time were proportional to the samples
   processed, is ``(W + h - 1) / h``; the case names carry it (``limit ...x``). The streams are primed
   with the window's first ``W - 1`` samples, so the first hop's outputs equal the window's last
   ``h`` outputs, which the check compares.

3. ``one layer, one sample``: the per-layer cost of a one-sample step, ``StreamingConv1d.step`` of a
   depthwise layer (C 64, K 3, dilation 1, 64, 512), next to ``nn.Conv1d`` computing the same output
   from the ``1 + (K-1)*dilation`` samples it reads.

All groups time inference (``torch.no_grad()``; the ``fwd`` mode).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

import accel.ops as ops
from accel.bench.case import Case, Setup, element_size, no_grad_setup, tolerance
from accel.nn import TCN, StreamingConv1d, StreamingTCN

# decode step: (B streams, C channels, K) per preset
DECODE = {"full": (32, 2048, 4), "quick": (8, 1024, 4), "tiny": (2, 16, 4)}
# the bytes of one cycle of state and weight copies exceed this (cold caches), with at most MAX_COPIES
COLD_BYTES = {"cpu": 64 * 1024 ** 2, "cuda": 256 * 1024 ** 2}
MAX_COPIES = 64

# streaming TCN: (C, layers, hops) per preset
TCN_SHAPES = {"full": (64, 10, (1, 4, 16, 64, 256)), "quick": (64, 10, (1, 16, 256)), "tiny": (4, 4, (1, 8))}
TCN_K = 3

DECODE_PEER = "transformers causal_conv1d_update"
COPY_PEER = "copy of state+weights"
RECOMPUTE_PEER = "recompute window"
TORCH_STREAM_PEER = "torch cat+conv1d streaming"
CONV_PEER = "nn.Conv1d on the window"
# one-sample step of one TCN layer: (C, dilation) per preset
LAYER_SHAPES = {"full": (64, (1, 64, 512)), "quick": (64, (1, 512)), "tiny": (4, (1, 4))}


# --------------------------------------------------------------------------- decode step

def causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None):
    """transformers' torch fallback (``models/mamba/modeling_mamba.py``), verbatim but for ``ACT2FN``
    (``silu`` is ``F.silu`` there too)."""
    _, hidden_size, seq_len = hidden_states.shape
    state_len = conv_state.shape[-1]

    hidden_states_new = torch.cat([conv_state, hidden_states], dim=-1).to(weight.dtype)
    conv_state.copy_(hidden_states_new[:, :, -state_len:])
    out = F.conv1d(hidden_states_new, weight.unsqueeze(1), bias, padding=0, groups=hidden_size)
    out = out[:, :, -seq_len:]
    if activation is not None:
        out = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation](out)
    return out.to(hidden_states.dtype)


def decode_bytes(B: int, C: int, K: int, dtype: str) -> int:
    """The least bytes a decode step moves: the state (B, C, K-1) read and written, weight and bias read."""
    return (2 * B * C * (K - 1) + C * K + C) * element_size(dtype)


def decode_copies(B: int, C: int, K: int, device: str, dtype: str) -> int:
    key = "cuda" if device.startswith("cuda") else "cpu"
    return int(max(1, min(MAX_COPIES, math.ceil(COLD_BYTES[key] / decode_bytes(B, C, K, dtype)))))


def build_decode(*, B: int, C: int, K: int, device: str, dtype: str, copies: int = 1, seed: int = 0) -> Setup:
    """accel's streaming_conv1d (h = 1) vs transformers' causal_conv1d_update vs a copy of the same bytes."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    x = draw(B, C, 1)
    weights = [(draw(C, 1, K, scale=K ** -0.5), draw(C, scale=0.1)) for _ in range(copies)]
    initial = [draw(B, C, K - 1) for _ in range(copies)]
    accel_states = [s.clone() for s in initial]
    peer_states = [s.clone() for s in initial]
    del initial
    n = decode_bytes(B, C, K, dtype) // (2 * element_size(dtype))  # elements copied: bytes read + written
    # random, written buffers: no first-touch page faults in the timed rounds, no pages of one repeated value
    srcs = [draw(n) for _ in range(copies)]
    dsts = [draw(n) for _ in range(copies)]
    at = {"accel": 0, "peer": 0, "copy": 0}

    def turn(name: str) -> int:
        i = at[name]
        at[name] = (i + 1) % copies
        return i

    def accel_fn():
        i = turn("accel")
        w, b = weights[i]
        return ops.streaming_conv1d(x, accel_states[i], w, b, groups=C, activation="silu")

    def peer_fn():
        i = turn("peer")
        w, b = weights[i]
        return causal_conv1d_update(x, peer_states[i], w.view(C, K), b, activation="silu")

    def copy_fn():
        i = turn("copy")
        return dsts[i].copy_(srcs[i])

    return no_grad_setup({"accel": accel_fn, DECODE_PEER: peer_fn, COPY_PEER: copy_fn})


# --------------------------------------------------------------------------- streaming TCN

def make_tcn(C: int, layers: int, device: str, dtype: str, seed: int = 0) -> TCN:
    g = torch.Generator().manual_seed(seed)
    tcn = TCN(C, kernel_size=TCN_K, num_layers=layers, activation="gelu")
    with torch.no_grad():  # small weights keep the residual stack finite
        for layer in tcn.layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * (0.5 / TCN_K))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.01)
    return tcn.to(device=device, dtype=getattr(torch, dtype)).requires_grad_(False)


class TorchStreamingTCN:
    """The stateful stream in plain PyTorch: per layer, concatenate the state and the input, keep the
    tail as the next state, ``F.conv1d`` over the concatenation, GELU, residual."""

    def __init__(self, tcn: TCN, batch: int):
        self.layers = [(c.weight, c.bias, c.dilation[0], (c.kernel_size[0] - 1) * c.dilation[0]) for c in tcn.layers]
        w = tcn.layers[0].weight
        self.states = [w.new_zeros(batch, tcn.channels, span) for _, _, _, span in self.layers]

    def step(self, x):
        for (w, b, d, span), state in zip(self.layers, self.states):
            u = torch.cat([state, x], dim=-1)
            state.copy_(u[..., u.shape[-1] - span:])
            x = F.gelu(F.conv1d(u, w, b, dilation=d, groups=u.shape[1])) + x
        return x


def build_tcn_stream(*, B: int, C: int, layers: int, h: int, device: str, dtype: str, seed: int = 0) -> Setup:
    """A hop of h samples through a streamed TCN vs recomputing the window vs a plain PyTorch stream."""
    tcn = make_tcn(C, layers, device, dtype, seed)
    W = tcn.receptive_field
    g = torch.Generator().manual_seed(seed + 1)
    window = torch.randn(B, C, W - 1 + h, generator=g).to(device=device, dtype=getattr(torch, dtype))
    history, hop = window[..., :W - 1], window[..., W - 1:].contiguous()
    stream = StreamingTCN(tcn)
    torch_stream = TorchStreamingTCN(tcn, B)
    accel_step = stream.step

    with torch.no_grad():  # prime both streams with the window's history
        stream.reset(B)
        accel_step(history)
        torch_stream.step(history)

    return no_grad_setup({
        "accel": lambda: accel_step(hop),
        RECOMPUTE_PEER: lambda: tcn(window)[..., W - 1:],
        TORCH_STREAM_PEER: lambda: torch_stream.step(hop),
    })


# --------------------------------------------------------------------------- one layer, one sample

def build_layer_step(*, C: int, dilation: int, device: str, dtype: str, seed: int = 0) -> Setup:
    """One depthwise TCN layer's one-sample step vs nn.Conv1d computing that output from its window."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    conv = torch.nn.Conv1d(C, C, TCN_K, dilation=dilation, groups=C).to(device=device, dtype=dt).requires_grad_(False)
    window = torch.randn(1, C, 1 + (TCN_K - 1) * dilation, generator=g).to(device=device, dtype=dt)
    layer = StreamingConv1d.from_module(conv)
    with torch.no_grad():  # prime the state with the window's history
        layer.reset(1)
        layer.step(window[..., :-1])
    sample = window[..., -1:].contiguous()
    state = layer.state.clone()

    def accel_fn():
        layer.state.copy_(state)  # every call continues the same history, so its output is the check's
        return layer.step(sample)

    return no_grad_setup({"accel": accel_fn, CONV_PEER: lambda: conv(window)})


# --------------------------------------------------------------------------- cases

def cases(args) -> List[Case]:
    size, device, dtype = args.size, args.device, args.dtype
    out: List[Case] = []

    B, C, K = DECODE[size]
    copies = decode_copies(B, C, K, device, dtype)
    nbytes = decode_bytes(B, C, K, dtype)
    params = dict(B=B, C=C, K=K, device=device, dtype=dtype, copies=copies)
    out.append(Case(
        op="streaming", group=f"decode step (h=1), {device} {dtype}", name=f"B{B} C{C} K{K} silu", mode="fwd",
        builder=build_decode, params=params, peers=(DECODE_PEER, COPY_PEER), check=(DECODE_PEER,),
        tol=tolerance(dtype, "fwd"), bw_bytes=nbytes, bw_ref=COPY_PEER, bw_ref_bytes=nbytes,
        warm_params=dict(params, B=min(B, 2), C=min(C, 16), copies=1),
        note=(f"depthwise, state of K-1 samples per row; {copies} copies of state and weights cycled, one per "
              f"call (cold caches); '{COPY_PEER}' copies as many bytes as the op must move (state read + "
              "written, weight + bias read): its ratio, and the % in the GB/s column (against its fastest "
              "round), is the fraction of the copy bandwidth accel reaches"),
    ))

    C, layers, hops = TCN_SHAPES[size]
    W = 1 + (TCN_K - 1) * (2 ** layers - 1)
    group = f"streaming TCN ({layers} layers, C{C} K{TCN_K}, W {W}), {device} {dtype}"
    for h in hops:
        params = dict(B=1, C=C, layers=layers, h=h, device=device, dtype=dtype)
        out.append(Case(
            op="streaming", group=group, name=f"hop {h} (limit {(W + h - 1) / h:.0f}x)", mode="fwd",
            builder=build_tcn_stream, params=params, peers=(RECOMPUTE_PEER, TORCH_STREAM_PEER),
            check=(RECOMPUTE_PEER, TORCH_STREAM_PEER), tol=tolerance(dtype, "fwd"),
            warm_params=dict(params, C=min(C, 4), layers=min(layers, 3), h=min(h, 4)),
            note=(f"one stream; limit = (W + h - 1) / h, the '{RECOMPUTE_PEER}' ratio if time were proportional "
                  f"to the samples processed (W = receptive field {W}); GELU + residual per layer, dilations "
                  f"1..{2 ** (layers - 1)}"),
        ))
    C, dilations = LAYER_SHAPES[size]
    for d in dilations:
        params = dict(C=C, dilation=d, device=device, dtype=dtype)
        out.append(Case(
            op="streaming", group=f"one layer, one sample (C{C} K{TCN_K} depthwise), {device} {dtype}",
            name=f"dilation {d}", mode="fwd", builder=build_layer_step, params=params, peers=(CONV_PEER,),
            check=(CONV_PEER,), tol=tolerance(dtype, "fwd"), warm_params=params,
            note=(f"accel: StreamingConv1d.step of one sample (with the state reset to the same history each "
                  f"call); '{CONV_PEER}': nn.Conv1d on the 1 + (K-1)*dilation samples that output reads; the "
                  "accel ms column is the per-layer cost of a one-sample step"),
        ))
    return out
