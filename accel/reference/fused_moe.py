"""Reference mixture-of-experts: routing and a per-expert Python loop (the test oracle).

Written for clarity, not speed: every expert's tokens are gathered, run through the gated MLP
``down(act(gate(x)) * up(x))`` and added back with their routing weights, as transformers' eager
experts do. Computes in the inputs' dtype unless ``compute_dtype`` is given.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_moe", "moe_route"]

_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "none": lambda t: t,
}


def moe_route(router_logits: Tensor, top_k: int, renormalize: bool = True,
              scoring: str = "softmax") -> Tuple[Tensor, Tensor]:
    """Top-k routing: ``(topk_weights (T, k), topk_ids int64 (T, k))``, weights float32 (float64 for
    float64 logits).

    ``softmax``: probabilities over all experts, the k largest kept (renormalised to sum to 1 if
    asked). ``sigmoid``: independent sigmoid scores, the k largest kept (renormalised if asked).
    Differentiable with respect to ``router_logits`` through the kept weights.
    """
    logits = router_logits.double() if router_logits.dtype == torch.float64 else router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(hidden: Tensor, gate_up_proj: Tensor, down_proj: Tensor, *, router_logits: Optional[Tensor] = None,
              topk_weights: Optional[Tensor] = None, topk_ids: Optional[Tensor] = None, top_k: int = 2,
              renormalize: bool = True, scoring: str = "softmax", activation: str = "silu",
              compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``out[t] = sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with ``e = topk_ids[t, j]``.

    hidden ``(T, H)``, gate_up_proj ``(E, 2I, H)`` (gate rows first), down_proj ``(E, H, I)``.
    """
    if router_logits is not None:
        topk_weights, topk_ids = moe_route(router_logits, top_k, renormalize, scoring)
    dt = compute_dtype or hidden.dtype
    x = hidden.to(dt)
    w1, w2 = gate_up_proj.to(dt), down_proj.to(dt)
    inter = w2.shape[-1]
    act = _ACT[activation]
    out = torch.zeros(x.shape, dtype=dt, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        gu = x[tok] @ w1[e].t()
        h = act(gu[:, :inter]) * gu[:, inter:]
        y = (h @ w2[e].t()) * topk_weights[tok, slot, None].to(dt)
        out = out.index_add(0, tok, y)
    return out.to(hidden.dtype)
