"""Sigmoid flash attention: dense, variable-length (packed) and KV-cache entry points.

``O = sigmoid(scale * Q K^T + bias + alibi) V`` computed tile by tile: no ``(Lq, Lk)`` matrix is
ever stored, forward or backward, and no row statistics are needed (there is no normaliser).
"""
from __future__ import annotations

import importlib
import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from accel import _ext
from accel.ops._capability import Capability, Example

_ext.load()

Bias = Union[None, float, int, Tensor]
_NAME = "sigmoid_attention"


def _examples(device: torch.device, dtype: torch.dtype):
    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    reference = importlib.import_module("accel.reference.sigmoid_attention")

    cu_q = torch.tensor([0, 5, 5, 22], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 13, 27], device=device, dtype=torch.int32)
    seqlens = torch.tensor([3, 17], device=device, dtype=torch.int32)
    return [
        Example("GQA causal D40", sigmoid_attention, (t(2, 4, 13, 40), t(2, 2, 19, 40), t(2, 2, 19, 40)),
                dict(causal=True)),
        Example("window, ALiBi, float bias", sigmoid_attention, (t(1, 3, 9, 24), t(1, 3, 9, 24), t(1, 3, 9, 24)),
                dict(window=(3, 2), alibi_slopes=torch.tensor([0.5, 0.25, 0.125], device=device, dtype=dtype), bias=-1.5)),
        Example("varlen causal", sigmoid_attention_varlen,
                (t(22, 2, 16), t(27, 2, 16), t(27, 2, 16), cu_q, cu_k, 17, 14), dict(causal=True),
                reference=lambda q, k, v, cq, ck, mq, mk, **kw: reference.sigmoid_attention_varlen(q, k, v, cq, ck, **kw)),
        Example("kvcache append 1", sigmoid_attention_kvcache,
                (t(2, 4, 1, 32, grad=False), t(2, 2, 20, 32, grad=False), t(2, 2, 20, 32, grad=False), seqlens,
                 t(2, 2, 1, 32, grad=False), t(2, 2, 1, 32, grad=False)),
                reference=reference.sigmoid_attention_kvcache),
    ]


CAPABILITY = Capability(
    name="sigmoid_attention",
    summary="O = sigmoid(scale QK^T + b) V: causal, sliding window, ALiBi, GQA/MQA, varlen, KV cache",
    functions=("sigmoid_attention", "sigmoid_attention_varlen", "sigmoid_attention_kvcache"),
    ops=("sigmoid_attention_fwd", "sigmoid_attention_bwd"),
    dtypes={"cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
            "cuda": (torch.float32, torch.bfloat16, torch.float16)},
    examples=_examples,
    modules=("SigmoidAttention", "SigmoidMultiheadAttention", "AdaptedSigmoidMultiheadAttention"),
    bench="attention",
    doc="docs/ops/sigmoid_attention.md",
    limits={"head dim": "CPU: any; CUDA: up to 256", "GQA": "H_q a multiple of H_kv",
            "CUDA lengths": "L_q, L_k below 2^30; B and H_q up to 65535"},
    cuda_min_arch={torch.bfloat16: 80, torch.float16: 80},
)


def _resolve_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{_NAME}: scale must be a float or None, got {scale!r}")
    return float(scale)


def _resolve_bias(bias: Bias) -> Tuple[Optional[Tensor], Optional[float]]:
    if bias is None:
        return None, None
    if isinstance(bias, Tensor):
        return bias, None
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
        raise ValueError(f"{_NAME}: bias must be None, a float or a (H_q,) tensor, got {type(bias).__name__}")
    return None, float(bias)


def _resolve_window(window: Sequence[int], causal: bool) -> Tuple[int, int]:
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"{_NAME}: window must be a pair (left, right) of ints, got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{_NAME}: window sizes must be >= 0, or -1 for unbounded, got {tuple(window)}")
    if causal:
        if right > 0:
            raise ValueError(f"{_NAME}: causal=True means a right window of 0, got window={tuple(window)}")
        right = 0
    return left, right


def _check_tensor(name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{_NAME}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{_NAME}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


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
) -> Tensor:
    """Fused sigmoid attention on ``(B, H, L, D)`` tensors (the layout of ``F.scaled_dot_product_attention``).

    Args:
        q: ``(B, H_q, L_q, D)``; k, v: ``(B, H_kv, L_k, D)`` with ``H_q`` a multiple of ``H_kv`` (GQA/MQA).
            Any strides with a contiguous last dim (e.g. ``x.transpose(1, 2)`` of ``(B, L, H, D)``).
        bias: the logit bias: a float, a per-head ``(H_q,)`` tensor (not differentiated), or ``None``
            for the paper's ``-log(L_k)``.
        scale: logit scale, default ``1/sqrt(D)``.
        causal: mask keys after the query, aligned bottom-right (query ``i`` sits at key ``i + L_k - L_q``).
        window: sliding window ``(left, right)`` in keys around the aligned position; -1 is unbounded.
        alibi_slopes: ``(H_q,)`` or ``(B, H_q)``; adds ``-slope * |i + L_k - L_q - j|`` to the logits.

    Returns:
        ``(B, H_q, L_q, D)`` contiguous, in the inputs' dtype. CPU: float32, float64, bfloat16, float16;
        CUDA: float16, bfloat16 (tensor cores) and float32.
    """
    _check_tensor("q", q, 4, "(B, H_q, L_q, D)")
    _check_tensor("k", k, 4, "(B, H_kv, L_k, D)")
    _check_tensor("v", v, 4, "(B, H_kv, L_k, D)")
    bias_t, bias_v = _resolve_bias(bias)
    left, right = _resolve_window(window, causal)
    return torch.ops.accel.sigmoid_attention_fwd(
        q, k, v, None, None, None, q.shape[2], k.shape[2], _resolve_scale(scale, q.shape[-1]), bias_t, bias_v,
        bool(causal), left, right, alibi_slopes)


def sigmoid_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    bias: Bias = None,
    scale: Optional[float] = None,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None,
) -> Tensor:
    """Sigmoid attention over packed variable-length sequences (flash-attention's varlen layout).

    ``q`` is ``(total_q, H_q, D)``, ``k``/``v`` ``(total_k, H_kv, D)``; sequence ``b`` owns rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of ``q`` and the matching rows of ``k``/``v``
    (``cu_seqlens_*`` int32 ``(B + 1,)``, starting at 0, non-decreasing). ``max_seqlen_*`` bound the
    lengths. The default bias is ``-log(len_k)`` of each sequence. Returns ``(total_q, H_q, D)``.
    """
    _check_tensor("q", q, 3, "(total_q, H_q, D)")
    _check_tensor("k", k, 3, "(total_k, H_kv, D)")
    _check_tensor("v", v, 3, "(total_k, H_kv, D)")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, cu, 1, "(B + 1,)")
        if cu.dtype != torch.int32:
            raise ValueError(f"{_NAME}: {name} must be int32, got {cu.dtype}")
    if cu_seqlens_q.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        _check_cu_seqlens_values(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
        _check_cu_seqlens_values(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    bias_t, bias_v = _resolve_bias(bias)
    left, right = _resolve_window(window, causal)
    return torch.ops.accel.sigmoid_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, None, int(max_seqlen_q), int(max_seqlen_k),
        _resolve_scale(scale, q.shape[-1]), bias_t, bias_v, bool(causal), left, right, alibi_slopes)


def _check_cu_seqlens_values(cu: Tensor, total: int, max_len: int, name: str) -> None:
    """The CUDA kernels trust cu_seqlens; check it on the host first (the CPU kernel checks natively)."""
    c = cu.cpu()
    if c.numel() < 2 or int(c[0]) != 0:
        raise ValueError(f"{_NAME}: {name} must start at 0 and have B + 1 >= 2 entries, got {c.tolist()}")
    d = c[1:] - c[:-1]
    if bool((d < 0).any()):
        raise ValueError(f"{_NAME}: {name} must be non-decreasing, got {c.tolist()}")
    if int(d.max()) > max_len:
        raise ValueError(f"{_NAME}: a sequence in {name} has length {int(d.max())} > the given maximum {max_len}")
    if int(c[-1]) > total:
        raise ValueError(f"{_NAME}: {name}[-1] = {int(c[-1])} is beyond the {total} packed rows")


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
    """Decoding step: append ``k_new``/``v_new`` to the cache in place, then attend over each row's valid keys.

    Args:
        q: ``(B, H_q, L_new, D)`` queries of the new tokens.
        k_cache, v_cache: ``(B, H_kv, L_max, D)`` caches (the SDPA layout, as transformers' static cache).
        cache_seqlens: int32 ``(B,)``, tokens already in each row of the cache.
        k_new, v_new: optional ``(B, H_kv, L_new, D)`` written at ``cache_seqlens[b]:cache_seqlens[b] + L_new``.
        causal: defaults to True (the new tokens see the cache and the new tokens before them).

    Returns:
        ``(B, H_q, L_new, D)``. Batch ``b`` attends to its first ``cache_seqlens[b] + L_new`` keys (``+ 0``
        without ``k_new``); the default bias is ``-log`` of that length. ``cache_seqlens`` is not updated.
    """
    _check_tensor("q", q, 4, "(B, H_q, L_new, D)")
    _check_tensor("k_cache", k_cache, 4, "(B, H_kv, L_max, D)")
    _check_tensor("v_cache", v_cache, 4, "(B, H_kv, L_max, D)")
    _check_tensor("cache_seqlens", cache_seqlens, 1, "(B,)")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"{_NAME}: cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{_NAME}: k_new and v_new must be given together")
    seqused = cache_seqlens
    if k_new is not None:
        _check_tensor("k_new", k_new, 4, "(B, H_kv, L_new, D)")
        _check_tensor("v_new", v_new, 4, "(B, H_kv, L_new, D)")
        B, hkv, lmax, d = k_cache.shape
        n_new = k_new.shape[2]
        if k_new.shape != (B, hkv, n_new, d) or v_new.shape != k_new.shape:
            raise ValueError(f"{_NAME}: k_new and v_new must have shape (B, H_kv, L_new, D) = ({B}, {hkv}, L_new, {d}) "
                             f"to match the cache, got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"{_NAME}: k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
        for name, t in (("k_new", k_new), ("v_new", v_new), ("v_cache", v_cache)):
            if t.dtype != k_cache.dtype or t.device != k_cache.device:
                raise ValueError(f"{_NAME}: {name} must have k_cache's dtype and device ({k_cache.dtype}, "
                                 f"{k_cache.device}), got {t.dtype}, {t.device}")
        if cache_seqlens.shape[0] != B or cache_seqlens.device != k_cache.device:
            raise ValueError(f"{_NAME}: cache_seqlens must be a ({B},) tensor on {k_cache.device}, got "
                             f"{tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
        if n_new > lmax:
            raise ValueError(f"{_NAME}: cannot append {n_new} tokens to a cache of length {lmax}")
        _check_cache_lengths(cache_seqlens, n_new, lmax)
        if n_new:
            idx = (cache_seqlens.to(torch.int64).unsqueeze(1)
                   + torch.arange(n_new, device=k_cache.device)).view(B, 1, n_new, 1).expand(B, hkv, n_new, d)
            k_cache.scatter_(2, idx, k_new)
            v_cache.scatter_(2, idx, v_new)
        seqused = cache_seqlens + n_new
    elif cache_seqlens.is_cuda:
        # the CPU kernel checks seqused_k itself; the CUDA kernels trust it
        _check_cache_lengths(cache_seqlens, 0, k_cache.shape[2])
    bias_t, bias_v = _resolve_bias(bias)
    left, right = _resolve_window(window, causal)
    return torch.ops.accel.sigmoid_attention_fwd(
        q, k_cache, v_cache, None, None, seqused, q.shape[2], k_cache.shape[2], _resolve_scale(scale, q.shape[-1]),
        bias_t, bias_v, bool(causal), left, right, alibi_slopes)


def _check_cache_lengths(cache_seqlens: Tensor, n_new: int, lmax: int) -> None:
    """``0 <= cache_seqlens[b]`` and ``cache_seqlens[b] + n_new <= lmax``, read with one host sync.

    Skipped while compiling or capturing a CUDA graph (the values are not readable there).
    """
    if torch.compiler.is_compiling() or cache_seqlens.numel() == 0:
        return
    if cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, top = torch.stack([cache_seqlens.min(), cache_seqlens.max()]).tolist()
    if low < 0 or top + n_new > lmax:
        raise ValueError(f"{_NAME}: the cache is too small: cache_seqlens up to {top} plus {n_new} new tokens "
                         f"exceed its length {lmax} (or a cache_seqlens entry is negative: min {low})")


# ---------------------------------------------------------------- fake (meta) implementations

@torch.library.register_fake("accel::sigmoid_attention_fwd")
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale, bias, bias_value,
              causal, window_left, window_right, alibi_slopes):
    torch._check(q.dtype == k.dtype and q.dtype == v.dtype, lambda: f"{_NAME}: q, k and v dtypes must match")
    torch._check(q.shape[-1] == k.shape[-1] and q.shape[-1] == v.shape[-1], lambda: f"{_NAME}: head dims must match")
    torch._check(q.dim() in (3, 4), lambda: f"{_NAME}: q must be 4-D (dense) or 3-D (varlen)")
    return q.new_empty(q.shape)


@torch.library.register_fake("accel::sigmoid_attention_bwd")
def _bwd_fake(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale, bias,
              bias_value, causal, window_left, window_right, alibi_slopes):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    cu_q, cu_k, seqused, bias = inputs[3], inputs[4], inputs[5], inputs[9]
    alibi = inputs[14]
    ctx.save_for_backward(q, k, v, cu_q, cu_k, seqused, bias, alibi)
    ctx.args = (inputs[6], inputs[7], inputs[8], inputs[10], inputs[11], inputs[12], inputs[13])


def _backward(ctx, grad_out):
    q, k, v, cu_q, cu_k, seqused, bias, alibi = ctx.saved_tensors
    max_q, max_k, scale, bias_value, causal, left, right = ctx.args
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.accel.sigmoid_attention_bwd(
        grad_out, q, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, bias, bias_value, causal, left, right, alibi)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None) + (None,) * 12


torch.library.register_autograd("accel::sigmoid_attention_fwd", _backward, setup_context=_setup_context)
