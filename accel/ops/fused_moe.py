"""Fused mixture-of-experts: top-k routing, grouped gated-MLP experts and the weighted combine.

One registered op runs the whole expert block (``accel::fused_moe_fwd``, with its backward
``accel::fused_moe_bwd``), another the routing (``accel::moe_route`` / ``moe_route_backward``), so
a decode step costs two native calls and no per-expert Python.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from accel import _ext
from accel.ops._capability import Capability, Example
from accel.ops._common import fake_dims, fake_grad, fake_same_device, grads_for, int_arg, size, tensor_arg

_ext.load()

_NAME = "fused_moe"


def _examples(device: torch.device, dtype: torch.dtype):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    T, E, H, I = 11, 5, 24, 13
    ids = torch.tensor([[(3 * i) % E, (3 * i + 1) % E] for i in range(T)], device=device)
    return [
        Example("routed from logits, top-2 softmax silu", fused_moe,
                (t(T, H), t(E, 2 * I, H, scale=H ** -0.5), t(E, H, I, scale=I ** -0.5)),
                dict(router_logits=t(T, E), top_k=2)),
        Example("given routing, sigmoid scores, gelu", fused_moe,
                (t(T, H), t(E, 2 * I, H, scale=H ** -0.5), t(E, H, I, scale=I ** -0.5)),
                dict(topk_weights=torch.rand(T, 2, device=device, dtype=dtype, requires_grad=True), topk_ids=ids,
                     activation="gelu")),
        Example("routing only, top-3 sigmoid", moe_route, (t(T, E), 3), dict(scoring="sigmoid")),
    ]


def _sanitize_examples(device: torch.device, dtype: torch.dtype):
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    return [Example(f"T{T} E{E} H{H} I{I} top-{k}", fused_moe,
                    (t(T, H), t(E, 2 * I, H, scale=H ** -0.5), t(E, H, I, scale=I ** -0.5)),
                    dict(router_logits=t(T, E), top_k=k))
            for T, E, H, I, k in [(0, 4, 64, 96, 2), (1, 8, 65, 33, 2), (37, 13, 130, 70, 4), (300, 4, 256, 128, 1)]]


CAPABILITY = Capability(
    name="fused_moe",
    summary="top-k routing + grouped gated-MLP experts + weighted combine, tokens grouped by expert",
    functions=("fused_moe", "moe_route"),
    ops=("fused_moe_fwd", "fused_moe_bwd", "moe_route", "moe_route_backward"),
    dtypes={"cpu": (torch.float32, torch.bfloat16, torch.float64, torch.float16),
            "cuda": (torch.float32, torch.bfloat16, torch.float16)},
    examples=_examples,
    modules=("FusedMoE",),
    bench="moe",
    doc="docs/ops/fused_moe.md",
    limits={"layout": "gate_up_proj (E, 2I, H), gate rows first; down_proj (E, H, I)",
            "top_k": "1 <= k <= E", "activation": "silu, gelu (erf), relu, none"},
    cuda_min_arch={torch.bfloat16: 80, torch.float16: 80},
    sanitize_examples=_sanitize_examples,
)


def _check_ids_on_host(topk_ids: Tensor, experts: int) -> None:
    """CUDA kernels skip out-of-range ids (no out-of-bounds access); this turns them into an error.

    It reads two numbers back from the GPU (one sync), so it is skipped while a CUDA graph is captured or
    torch.compile traces (the kernels stay safe either way).
    """
    if topk_ids.numel() == 0 or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return
    lo, hi = torch.stack(torch.aminmax(topk_ids)).tolist()  # one device-to-host copy
    if lo < 0 or hi >= experts:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{_NAME}: topk_ids must be in [0, E) = [0, {experts}), found {bad}")


def moe_route(router_logits: Tensor, top_k: int, *, renormalize: bool = True,
              scoring: str = "softmax") -> Tuple[Tensor, Tensor]:
    """Top-k routing in one native call.

    Args:
        router_logits: ``(T, E)`` in any floating dtype (scored in float32).
        top_k: experts per token, ``1 <= top_k <= E``.
        renormalize: rescale the kept weights to sum to 1 per token.
        scoring: ``"softmax"`` (over all experts, then top-k) or ``"sigmoid"`` (independent scores).

    Returns:
        ``(topk_weights, topk_ids)``: float32 ``(T, top_k)`` (float64 for float64 logits) in
        descending score order (ties: the lower expert id first) and int64 ``(T, top_k)``. Differentiable with respect to
        ``router_logits`` through the weights.
    """
    return torch.ops.accel.moe_route(router_logits, int_arg("moe_route", "top_k", top_k), bool(renormalize), scoring)


def fused_moe(
    hidden: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    *,
    router_logits: Optional[Tensor] = None,
    topk_weights: Optional[Tensor] = None,
    topk_ids: Optional[Tensor] = None,
    top_k: int = 2,
    renormalize: bool = True,
    scoring: str = "softmax",
    activation: str = "silu",
    check_ids: bool = True,
) -> Tensor:
    """``out[t] = sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with ``e = topk_ids[t, j]``.

    Args:
        hidden: ``(T, H)``; float32 or bfloat16 on CPU (also float64 and float16), float32,
            float16 or bfloat16 on CUDA.
        gate_up_proj: ``(E, 2I, H)``, gate rows first, then up (transformers v5 experts layout).
        down_proj: ``(E, H, I)``.
        router_logits: ``(T, E)``; when given, routing runs in the op (``top_k``, ``renormalize``,
            ``scoring`` apply) and gradients flow back to the logits.
        topk_weights, topk_ids: precomputed routing ``(T, k)`` instead of ``router_logits``;
            weights float32 or the hidden dtype, ids int64 or int32 in ``[0, E)``.
        activation: ``"silu"`` (default), ``"gelu"`` (erf), ``"relu"`` or ``"none"`` (bilinear).
        check_ids: on CUDA, read the ids' range back to the host and raise for ids outside
            ``[0, E)`` (the CPU kernel always checks). Costs a device sync per call; callers whose
            ids come from a top-k over E experts pass False. Out-of-range ids never cause an
            out-of-bounds access either way: the CUDA kernels drop them.

    Returns:
        ``(T, H)`` in the hidden dtype. Differentiable with respect to ``hidden``, both weights,
        ``topk_weights`` and ``router_logits``.
    """
    for name, t in (("hidden", hidden), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        tensor_arg(_NAME, name, t)
    if router_logits is not None:
        if topk_weights is not None or topk_ids is not None:
            raise ValueError(f"{_NAME}: pass either router_logits or topk_weights/topk_ids, not both")
        router_logits = tensor_arg(_NAME, "router_logits", router_logits)
        # routing and experts are two ops: neither sees both expert counts
        if router_logits.dim() == 2 and gate_up_proj.dim() == 3 and router_logits.shape[1] != gate_up_proj.shape[0]:
            raise ValueError(f"{_NAME}: router_logits has {router_logits.shape[1]} expert columns but gate_up_proj "
                             f"holds E = {gate_up_proj.shape[0]} experts; they must match")
        topk_weights, topk_ids = moe_route(router_logits, top_k, renormalize=renormalize, scoring=scoring)
    elif topk_weights is None or topk_ids is None:
        raise ValueError(f"{_NAME}: pass router_logits, or both topk_weights and topk_ids")
    else:
        tensor_arg(_NAME, "topk_weights", topk_weights)
        if tensor_arg(_NAME, "topk_ids", topk_ids).is_cuda and check_ids:
            _check_ids_on_host(topk_ids, size(gate_up_proj, 0))
    save = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, gate_up_proj, down_proj, topk_weights))
    out, _ = torch.ops.accel.fused_moe_fwd(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, activation, save)
    return out


# ---------------------------------------------------------------- fake (meta) implementations

@torch.library.register_fake("accel::moe_route")
def _route_fake(router_logits, top_k, renormalize, scoring):
    t = router_logits.shape[0]
    wdtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    return (router_logits.new_empty((t, top_k), dtype=wdtype),
            router_logits.new_empty((t, top_k), dtype=torch.int64))


@torch.library.register_fake("accel::moe_route_backward")
def _route_bwd_fake(grad_weights, router_logits, topk_weights, topk_ids, renormalize, scoring):
    return router_logits.new_empty(router_logits.shape)


@torch.library.register_fake("accel::fused_moe_fwd")
def _fwd_fake(hidden, gate_up_proj, down_proj, topk_weights, topk_ids, activation, save_cache):
    fake_dims(_NAME, hidden=(hidden, 2, "(T, H)"), gate_up_proj=(gate_up_proj, 3, "(E, 2I, H)"),
              topk_ids=(topk_ids, 2, "(T, k)"))
    fake_same_device(_NAME, "hidden", hidden, gate_up_proj=gate_up_proj, down_proj=down_proj,
                     topk_weights=topk_weights, topk_ids=topk_ids)
    rows = hidden.shape[0] * topk_ids.shape[1] if save_cache else 0
    cache = hidden.new_empty((rows, gate_up_proj.shape[1]))
    return hidden.new_empty(hidden.shape), cache


@torch.library.register_fake("accel::fused_moe_bwd")
def _bwd_fake(grad_out, hidden, gate_up_proj, down_proj, topk_weights, topk_ids, cache, activation, output_mask):
    return tuple(fake_grad(t, want) for t, want in zip((hidden, gate_up_proj, down_proj, topk_weights), output_mask))


# ---------------------------------------------------------------- autograd

def _route_setup(ctx, inputs, output):
    logits, _, renormalize, scoring = inputs
    weights, ids = output
    ctx.save_for_backward(logits, weights, ids)
    ctx.args = (renormalize, scoring)
    ctx.mark_non_differentiable(ids)


def _route_backward(ctx, grad_weights, grad_ids):
    logits, weights, ids = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None, None
    grad = torch.ops.accel.moe_route_backward(grad_weights.to(weights.dtype).contiguous(), logits, weights, ids,
                                              *ctx.args)
    return grad, None, None, None


torch.library.register_autograd("accel::moe_route", _route_backward, setup_context=_route_setup)


def _fwd_setup(ctx, inputs, output):
    hidden, w1, w2, weights, ids, activation, save_cache = inputs
    _, cache = output
    ctx.save_for_backward(hidden, w1, w2, weights, ids, cache)
    ctx.activation = activation


def _fwd_backward(ctx, grad_out, grad_cache):
    hidden, w1, w2, weights, ids, cache = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(need[2]), bool(need[3])]
    if grad_out is None or not any(mask):
        return (None,) * 7
    if cache.shape[0] != ids.shape[0] * ids.shape[1]:
        raise RuntimeError(f"{_NAME}: the forward ran without saving its activations (save_cache=False); "
                           "call accel.ops.fused_moe, which saves them when an input requires grad")
    dx, dw1, dw2, dw = torch.ops.accel.fused_moe_bwd(
        grad_out.contiguous(), hidden, w1, w2, weights, ids, cache, ctx.activation, mask)
    return grads_for(mask, (dx, dw1, dw2, dw), 7)


torch.library.register_autograd("accel::fused_moe_fwd", _fwd_backward, setup_context=_fwd_setup)
