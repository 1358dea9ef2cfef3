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
from accel.ops._common import fake_grad, grads_for, int_arg, size, tensor_arg

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


def _sanitize_examples(device: torch.device, dtype: torch.dtype):
    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    out = [Example(f"D{d} Lq{lq} Lk{lk}", sigmoid_attention, (t(1, 4, lq, d), t(1, 2, lk, d), t(1, 2, lk, d)), kw)
           for d, lq, lk, kw in [(59, 113, 203, dict(causal=True)), (128, 1, 239, {}),
                                 (256, 108, 256, dict(window=(17, 3))),
                                 (40, 129, 65, dict(alibi_slopes=torch.rand(4, device=device)))]]
    cu = torch.tensor([0, 5, 5, 70], device=device, dtype=torch.int32)
    out.append(Example("varlen D96", sigmoid_attention_varlen, (t(70, 4, 96), t(70, 4, 96), t(70, 4, 96), cu, cu, 65, 65),
                       dict(causal=True)))
    cache = dict(grad=False)
    out.append(Example("kvcache append at the last slot", sigmoid_attention_kvcache,
                       (t(2, 4, 1, 64, **cache), t(2, 4, 300, 64, **cache), t(2, 4, 300, 64, **cache),
                        torch.tensor([0, 299], device=device, dtype=torch.int32), t(2, 4, 1, 64, **cache),
                        t(2, 4, 1, 64, **cache))))
    return out


CAPABILITY = Capability(
    name="sigmoid_attention",
    summary="O = sigmoid(scale QK^T + b) V: causal, sliding window, ALiBi, GQA/MQA, varlen, KV cache",
    functions=("sigmoid_attention", "sigmoid_attention_varlen", "sigmoid_attention_kvcache"),
    ops=("sigmoid_attention_fwd", "sigmoid_attention_bwd", "kv_cache_append"),
    dtypes={"cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
            "cuda": (torch.float32, torch.bfloat16, torch.float16)},
    examples=_examples,
    modules=("SigmoidAttention", "SigmoidMultiheadAttention", "AdaptedSigmoidMultiheadAttention"),
    bench="attention",
    doc="docs/ops/sigmoid_attention.md",
    limits={"head dim": "CPU: any; CUDA: up to 256", "GQA": "H_q a multiple of H_kv",
            "CUDA lengths": "L_q, L_k below 2^30; B and H_q up to 65535"},
    cuda_min_arch={torch.bfloat16: 80, torch.float16: 80},
    sanitize_examples=_sanitize_examples,
)


def resolve_scale(scale: Optional[float]) -> Optional[float]:
    """A float scale or None (the default ``1/sqrt(D)``, filled in per call); refuses other types."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{_NAME}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def resolve_bias(bias: Bias) -> Union[None, float, Tensor]:
    """None, a float or a tensor, as the schema's ``bias``/``bias_value`` pair takes them; refuses other types."""
    if bias is None or isinstance(bias, Tensor):
        return bias
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
        raise TypeError(f"{_NAME}: bias must be None, a float or a per-head (H_q,) tensor, got {type(bias).__name__}")
    return float(bias)


def resolve_window(window: Sequence[int]) -> Tuple[int, int]:
    """``(left, right)`` as two ints; their range (and causal's right window of 0) is checked natively."""
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"{_NAME}: window must be a pair (left, right) of ints, got {window!r}") from None
    return left, right


def _options(q: Tensor, bias: Bias, scale: Optional[float], causal: bool, window, alibi_slopes) -> tuple:
    """The schema's trailing arguments ``scale, bias, bias_value, causal, window_left, window_right, alibi_slopes``."""
    scale = resolve_scale(scale)
    if scale is None:
        scale = 1.0 / math.sqrt(max(size(q, -1, 1), 1))
    bias = resolve_bias(bias)
    bias_t, bias_v = (bias, None) if isinstance(bias, Tensor) else (None, bias)
    return (scale, bias_t, bias_v, bool(causal), *resolve_window(window), alibi_slopes)


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
    q, k = tensor_arg(_NAME, "q", q), tensor_arg(_NAME, "k", k)
    return torch.ops.accel.sigmoid_attention_fwd(
        q, k, v, None, None, None, size(q, 2), size(k, 2), *_options(q, bias, scale, causal, window, alibi_slopes))


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
    q, k = tensor_arg(_NAME, "q", q), tensor_arg(_NAME, "k", k)
    cu_seqlens_q = tensor_arg(_NAME, "cu_seqlens_q", cu_seqlens_q)
    cu_seqlens_k = tensor_arg(_NAME, "cu_seqlens_k", cu_seqlens_k)
    return torch.ops.accel.sigmoid_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, None, int_arg(_NAME, "max_seqlen_q", max_seqlen_q),
        int_arg(_NAME, "max_seqlen_k", max_seqlen_k), *_options(q, bias, scale, causal, window, alibi_slopes))


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

    The append is ``accel::kv_cache_append`` (its schema declares the in-place writes, so the step
    compiles with ``torch.compile(fullgraph=True)``). On CUDA nothing is read back to the host, so the
    step can be captured in a CUDA graph: a row whose new tokens do not fit (``cache_seqlens[b] < 0`` or
    ``cache_seqlens[b] + L_new > L_max``) is left unwritten and attends over its keys clamped to
    ``[0, L_max]``; on the CPU such a row is an error.
    """
    q, k_cache = tensor_arg(_NAME, "q", q), tensor_arg(_NAME, "k_cache", k_cache)
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{_NAME}: k_new and v_new must be given together")
    seqused = cache_seqlens
    if k_new is not None:
        torch.ops.accel.kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens)
        seqused = cache_seqlens + k_new.shape[2]
    return torch.ops.accel.sigmoid_attention_fwd(
        q, k_cache, v_cache, None, None, seqused, size(q, 2), size(k_cache, 2),
        *_options(q, bias, scale, causal, window, alibi_slopes))


# ---------------------------------------------------------------- fake (meta) implementations

@torch.library.register_fake("accel::sigmoid_attention_fwd")
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale, bias, bias_value,
              causal, window_left, window_right, alibi_slopes):
    return q.new_empty(q.shape)


@torch.library.register_fake("accel::sigmoid_attention_bwd")
def _bwd_fake(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale, bias,
              bias_value, causal, window_left, window_right, alibi_slopes):
    return fake_grad(q, True), fake_grad(k, True), fake_grad(v, True)


@torch.library.register_fake("accel::kv_cache_append")
def _append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens):
    return None  # writes its first two arguments in place, as the schema declares


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
    return grads_for(ctx.needs_input_grad, (dq, dk, dv), 15)


torch.library.register_autograd("accel::sigmoid_attention_fwd", _backward, setup_context=_setup_context)
