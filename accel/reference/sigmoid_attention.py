"""Eager sigmoid attention: the test oracle and the benchmarks' "eager formula" peer.

``O = sigmoid(scale * Q K^T + bias + alibi) V`` over the allowed keys, with an ``(Lq, Lk)`` logit
matrix per head (this is what the fused kernels avoid). Masks follow flash-attention: query row
``i`` sits at key position ``i + Lk - Lq`` (bottom-right alignment).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sigmoid_attention", "sigmoid_attention_varlen", "sigmoid_attention_kvcache", "SigmoidMultiheadAttention"]

Bias = Union[None, float, Tensor]


def _allowed(lq: int, lk: int, causal: bool, window: Sequence[int], device) -> Optional[Tensor]:
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    i = torch.arange(lq, device=device).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk, device=device).unsqueeze(0)
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _bias_tensor(bias: Bias, hq: int, lk: int, dtype, device) -> Tensor:
    if bias is None:
        return torch.full((hq, 1, 1), -math.log(max(lk, 1)), dtype=dtype, device=device)
    if isinstance(bias, Tensor):
        return bias.to(dtype=dtype, device=device).reshape(hq, 1, 1)
    return torch.full((hq, 1, 1), float(bias), dtype=dtype, device=device)


def sigmoid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Bias = None,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
    seqused_k: Optional[Tensor] = None,
) -> Tensor:
    """Reference for ``accel.ops.sigmoid_attention`` on ``(B, H, L, D)`` tensors, computed in the inputs' dtype.

    ``seqused_k`` (``(B,)``) restricts batch ``b`` to its first ``seqused_k[b]`` keys (the KV-cache case);
    the default bias then is ``-log(seqused_k[b])``.
    """
    if seqused_k is not None:
        outs = []
        for b in range(q.shape[0]):
            n = int(seqused_k[b])
            sl = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
            outs.append(sigmoid_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], bias=bias, scale=scale,
                                          causal=causal, window=window, alibi_slopes=sl))
        return torch.cat(outs, 0)
    B, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale + _bias_tensor(bias, hq, lk, q.dtype, q.device)
    if alibi_slopes is not None:
        pos = (torch.arange(lq, device=q.device).unsqueeze(1) + (lk - lq)) - torch.arange(lk, device=q.device)
        slopes = alibi_slopes.to(q.dtype)
        slopes = slopes.reshape(1, hq, 1, 1) if slopes.dim() == 1 else slopes.reshape(B, hq, 1, 1)
        s = s - slopes * pos.abs().to(q.dtype)
    p = torch.sigmoid(s)
    ok = _allowed(lq, lk, causal, window, q.device)
    if ok is not None:
        p = p.masked_fill(~ok, 0)
    return torch.matmul(p, v)


def sigmoid_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    bias: Bias = None,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
) -> Tensor:
    """Reference for packed ``(total, H, D)`` sequences: each sequence attended alone."""
    out = q.new_zeros(q.shape)
    cq = [int(x) for x in cu_seqlens_q]
    ck = [int(x) for x in cu_seqlens_k]
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        sl = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b])
        o = sigmoid_attention(qs, ks, vs, bias=bias, scale=scale, causal=causal, window=window, alibi_slopes=sl)
        out[cq[b]:cq[b + 1]] = o[0].transpose(0, 1)
    return out


def sigmoid_attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    *,
    bias: Bias = None,
    scale: Optional[float] = None,
    causal: bool = True,
    window: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
) -> Tensor:
    """Reference for the decoding step: writes ``k_new``/``v_new`` into the caches in place at
    ``cache_seqlens[b]``, then attends over each row's first ``cache_seqlens[b] + L_new`` keys."""
    used = [int(n) for n in cache_seqlens]
    if k_new is not None:
        n_new = k_new.shape[2]
        for b, start in enumerate(used):
            k_cache[b, :, start:start + n_new] = k_new[b]
            v_cache[b, :, start:start + n_new] = v_new[b]
        used = [n + n_new for n in used]
    return sigmoid_attention(q, k_cache, v_cache, bias=bias, scale=scale, causal=causal, window=window,
                             alibi_slopes=alibi_slopes, seqused_k=torch.tensor(used))


class SigmoidMultiheadAttention(nn.Module):
    """Eager sigmoid multi-head attention with ``nn.MultiheadAttention``'s parameters (batch_first only).

    The patch rule replaces it by ``accel.nn.SigmoidMultiheadAttention``, which has the same
    ``state_dict`` and runs the fused kernel.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True, attn_bias: Bias = None, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not batch_first:
            raise ValueError("the reference SigmoidMultiheadAttention supports batch_first=True only")
        if dropout:
            raise ValueError(f"the reference SigmoidMultiheadAttention has no attention dropout, got dropout={dropout}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.attn_bias = attn_bias
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, device=device, dtype=dtype)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool = False) -> Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        B, lq, _ = query.shape
        lk = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = F.linear(query, w_q, b_q).view(B, lq, h, d).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(B, lk, h, d).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(B, lk, h, d).transpose(1, 2)
        o = sigmoid_attention(q, k, v, bias=self.attn_bias, causal=is_causal)
        o = o.transpose(1, 2).reshape(B, lq, h * d)
        return self.out_proj(o)
