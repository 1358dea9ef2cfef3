"""The ``"accel_sigmoid"`` attention function for transformers' ``AttentionInterface``.

``O = sigmoid(scaling * Q K^T + b) V`` with accel's fused kernels; the mask each layer receives is a
:class:`~accel_transformers.masks.SigmoidAttentionMask` built once per forward by the matching mask
function (see ``masks.py`` for how transformers' masks map onto the kernels).

The bias ``b`` defaults to the paper's ``-log(n)``, ``n`` the number of keys of the sequence (padding
excluded). ``config.sigmoid_attn_bias`` overrides it: a float, or one float per attention head.
``n`` depends on how many keys a call sees, so with the default, decoding token by token from a
KV cache gives different logits from one forward over the whole sequence; models meant for
generation should set a fixed ``sigmoid_attn_bias`` (e.g. ``-log`` of the training sequence
length, the paper's ``b = -log(n)`` at that length).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from accel import _ext
from accel_transformers.masks import MaskNotSupported, SigmoidAttentionMask, plan_from_tensor
from accel_transformers.names import NAME

# Registering the backend must not need the native extension (a model can be built without it); the
# first forward then raises accel's "not built" error.
_KERNELS = _ext.available()  # read once: an lru_cache'd call inside a compiled forward makes dynamo warn
if _KERNELS:
    from accel.ops.sigmoid_attention import sigmoid_attention, sigmoid_attention_kvcache, sigmoid_attention_varlen

BIAS_ATTRIBUTE = "sigmoid_attn_bias"

# Keyword arguments some models pass that change the maths; the sigmoid kernel has none of them.
_UNSUPPORTED = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias (T5-style relative attention)",
    "head_mask": "a head mask",
    "indices": "sparse (indexed) attention",
    "block_indices": "block-sparse attention",
    "block_table": "a paged KV cache",
}


def _fail(module: nn.Module, message: str, error=ValueError):
    where = type(module).__name__ + (f" (layer {module.layer_idx})" if hasattr(module, "layer_idx") else "")
    return error(f"attn_implementation={NAME!r}, {where}: {message}")


def _config_bias(module: nn.Module, heads: int, device) -> Optional[object]:
    config = getattr(module, "config", None)
    bias = getattr(config, BIAS_ATTRIBUTE, None) if config is not None else None
    if bias is None:
        return None
    if isinstance(bias, Real) and not isinstance(bias, bool):
        return float(bias)
    if isinstance(bias, (list, tuple)) and len(bias) == heads and all(
            isinstance(b, Real) and not isinstance(b, bool) for b in bias):
        return torch.tensor([float(b) for b in bias], dtype=torch.float32, device=device)
    raise _fail(module, f"config.{BIAS_ATTRIBUTE} must be a float or a list of {heads} floats (one per attention "
                        f"head), got {bias!r}")


def _window(sliding_window: Optional[int], causal: bool, module: nn.Module) -> Tuple[int, int]:
    if sliding_window is None:
        return (-1, 0) if causal else (-1, -1)
    if not causal:
        raise _fail(module, "a sliding window without a mask from transformers' mask functions is ambiguous for "
                            "bidirectional attention (|q - k| <= w or < w); build the mask with create_*_mask")
    return int(sliding_window) - 1, 0  # keys k with q - w < k <= q, as transformers' sliding_window_overlay


def _plan(module: nn.Module, attention_mask, batch: int, lq: int, lk: int, is_causal: Optional[bool],
          sliding_window: Optional[int]) -> SigmoidAttentionMask:
    if isinstance(attention_mask, SigmoidAttentionMask):
        plan = attention_mask
        if (plan.batch_size, plan.q_length, plan.kv_length) != (batch, lq, lk):
            raise _fail(module, f"the mask was built for batch {plan.batch_size}, {plan.q_length} queries and "
                                f"{plan.kv_length} keys, but the layer got {batch}, {lq} and {lk}")
        return plan
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    pattern = (bool(causal), _window(sliding_window, bool(causal), module))
    if attention_mask is None:
        # No mask from transformers' mask functions (which always give a SigmoidAttentionMask here): as in
        # transformers' SDPA path, a causal layer is causal, and one query sees every key.
        if causal and 1 < lq != lk:
            raise _fail(module, f"no attention mask, {lq} queries and {lk} keys: how the queries align with the keys "
                                "is unknown; pass an attention mask")
        return SigmoidAttentionMask(batch, lq, lk, pattern[0], pattern[1])
    if isinstance(attention_mask, Tensor):
        try:
            return plan_from_tensor(attention_mask, batch, lq, lk, pattern)
        except MaskNotSupported as e:
            raise _fail(module, str(e)) from None
    raise _fail(module, f"unsupported attention mask of type {type(attention_mask).__name__}", TypeError)


def sigmoid_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """transformers attention function: ``query`` ``(B, H_q, L_q, D)``, ``key``/``value`` ``(B, H_kv, L_k, D)``
    (GQA: ``H_q`` a multiple of ``H_kv``, passed to the kernel as is) -> ``((B, L_q, H_q, D_v), None)``."""
    if dropout:
        raise _fail(module, f"attention dropout ({dropout}) is not supported: the fused sigmoid attention kernel "
                            "has no dropout. Set config.attention_dropout = 0.0 (or call model.eval())",
                    NotImplementedError)
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise _fail(module, f"{what} ({name}=...) is not supported by the sigmoid attention kernel",
                        NotImplementedError)
    if kwargs.get("output_attentions"):
        raise _fail(module, "output_attentions=True: the fused kernel never materialises the attention weights",
                    NotImplementedError)
    if not _KERNELS:
        _ext.load()  # raises ImportError saying how to build accel
    B, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[-1]
    if key.shape[-1] != d:
        raise _fail(module, f"query and key head dims differ ({d} vs {key.shape[-1]})")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    # The kernel takes one head dim; zero-padding q and k (or v) to the larger one changes no dot
    # product and no output column that is kept (as transformers' flash path does for MLA).
    width = max(d, dv)
    if d < width:
        query, key = F.pad(query, (0, width - d)), F.pad(key, (0, width - d))
    if dv < width:
        value = F.pad(value, (0, width - dv))
    bias = _config_bias(module, hq, query.device)
    plan = None
    if not isinstance(attention_mask, SigmoidAttentionMask):  # a plan from our mask function comes first
        plan = _fa_varlen_plan(module, kwargs, attention_mask, B, lq, lk, is_causal, sliding_window)
    if plan is None:
        plan = _plan(module, attention_mask, B, lq, lk, is_causal, sliding_window)
    op = dict(bias=bias, scale=scale, causal=plan.causal, window=plan.window)

    if plan.varlen:
        out = query.new_zeros(B * lq, hq, width)
        if plan.q_rows.numel():
            q = query.transpose(1, 2).reshape(B * lq, hq, width).index_select(0, plan.q_rows)
            k = key.transpose(1, 2).reshape(B * lk, hkv, width).index_select(0, plan.k_rows)
            v = value.transpose(1, 2).reshape(B * lk, hkv, width).index_select(0, plan.k_rows)
            o = sigmoid_attention_varlen(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q,
                                         plan.max_seqlen_k, **op)
            out = out.index_copy(0, plan.q_rows, o)
        out = out.view(B, lq, hq, width)
    else:
        if plan.seqused_k is not None:
            o = sigmoid_attention_kvcache(query, key, value, plan.seqused_k, **op)
        else:
            o = sigmoid_attention(query, key, value, **op)
        out = o.transpose(1, 2).contiguous()
    if dv < width:
        out = out[..., :dv].contiguous()
    return out, None


def _fa_varlen_plan(module: nn.Module, kwargs: dict, attention_mask, batch: int, lq: int, lk: int,
                    is_causal: Optional[bool], sliding_window: Optional[int]) -> Optional[SigmoidAttentionMask]:
    """Padding-free batches described by flash-attention kwargs (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``,
    e.g. from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) when no mask plan was built."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    given = [kwargs.get(n) is not None for n in names]
    if not any(given):
        return None
    if not all(given):
        raise _fail(module, f"flash-attention varlen kwargs must be given together: {names}")
    if batch != 1:
        raise _fail(module, f"packed (cu_seq_lens) inputs must have batch size 1, got {batch}")
    if attention_mask is not None:
        raise _fail(module, "got both an attention mask tensor and cu_seq_lens kwargs; pass one description")
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = _window(sliding_window, causal, module)
    return SigmoidAttentionMask(
        batch, lq, lk, causal, window,
        q_rows=torch.arange(lq, device=cu_q.device), k_rows=torch.arange(lk, device=cu_k.device),
        cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
        max_seqlen_q=int(kwargs["max_length_q"]), max_seqlen_k=int(kwargs["max_length_k"]), note="cu_seq_lens")
