"""Transformers' attention masks, mapped exactly onto accel's sigmoid attention kernels.

``sigmoid_attention_mask`` is registered with transformers' ``AttentionMaskInterface`` under the
same name as the attention function, so ``create_causal_mask`` & co. call it once per forward (per
mask type) and the attention layers receive a :class:`SigmoidAttentionMask`: a plan saying which
kernel call computes exactly the mask transformers asked for. Three plans exist:

- dense: no padding, a causal / bidirectional / sliding-window pattern recognised from the mask
  function itself (no mask is materialised; works under ``torch.compile(fullgraph=True)``);
  queries that are the tail of the keys (dynamic caches) run ``sigmoid_attention``, queries in a
  static cache run the KV-cache entry point with ``seqused_k`` so that the empty slots are skipped.
- varlen: anything else. The boolean mask transformers' SDPA path would use is materialised with
  transformers' own ``sdpa_mask`` (the ground truth), the padded tokens are dropped, and the
  packed-sequence call (``sigmoid_attention_varlen``; one sequence per batch row, or per packed
  segment) is used only after checking, element by element, that it computes exactly that mask.
  Masks no kernel call can reproduce (chunked attention through a KV cache, bidirectional
  image-token blocks, arbitrary 4-D masks) raise a ``ValueError`` naming the reason; nothing is silently ignored.

Conventions (checked against transformers 5): ``sliding_window=w`` keeps keys with
``q - w < k <= q`` (``window=(w - 1, 0)``), its bidirectional form ``|q - k| <= w``
(``window=(w, w)``); causal masks are bottom-right aligned, which is transformers' alignment
whenever the queries are the last tokens of the keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import masking_utils as mu
from transformers.utils.import_utils import is_tracing

Pattern = Tuple[bool, Tuple[int, int]]  # (causal, (window_left, window_right))

CAUSAL: Pattern = (True, (-1, 0))
BIDIRECTIONAL: Pattern = (False, (-1, -1))


@dataclass(frozen=True, eq=False)
class SigmoidAttentionMask:
    """How one attention mask maps onto accel's kernels (built by :func:`sigmoid_attention_mask`).

    ``batch_size``, ``q_length``, ``kv_length``: the shapes it was built for. ``causal``/``window``:
    the pattern, bottom-right aligned. Dense plans may carry ``seqused_k`` (``(B,)`` int32: each row
    attends to its first keys only). Varlen plans carry ``q_rows``/``k_rows`` (rows of the flattened
    ``(B * L, H, D)`` queries/keys that take part, grouped by sequence) and the ``cu_seqlens``.
    """

    batch_size: int
    q_length: int
    kv_length: int
    causal: bool
    window: Tuple[int, int]
    seqused_k: Optional[Tensor] = None
    q_rows: Optional[Tensor] = None
    k_rows: Optional[Tensor] = None
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    note: str = ""

    @property
    def varlen(self) -> bool:
        return self.q_rows is not None

    def __repr__(self) -> str:
        kind = "varlen" if self.varlen else ("dense+seqused_k" if self.seqused_k is not None else "dense")
        return (f"SigmoidAttentionMask({kind}, batch={self.batch_size}, q_length={self.q_length}, "
                f"kv_length={self.kv_length}, causal={self.causal}, window={self.window}"
                + (f", sequences={self.cu_seqlens_q.numel() - 1}" if self.varlen else "")
                + (f", {self.note}" if self.note else "") + ")")


class MaskNotSupported(ValueError):
    """The mask transformers built has no exact equivalent among accel's kernel calls."""


# ---------------------------------------------------------------- recognising transformers' mask functions

def _closure_vars(fn: Callable) -> dict:
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


# Code objects of transformers' mask-function factories: a function with the same code and the same
# closure values computes the same mask, so recognising them this way cannot be wrong, only incomplete.
# A factory this transformers release lacks gets a fresh sentinel code object that no mask
# function has, so its pattern is simply never recognised (older 5.x releases lack some).
def _factory_code(name: str, *args):
    factory = getattr(mu, name, None)
    if factory is None:
        return (lambda: None).__code__
    return factory(*args).__code__


_AND_CODE = _factory_code("and_masks", mu.causal_mask_function)
_SLIDING_CODE = _factory_code("sliding_window_overlay", 1)
_SLIDING_BIDIRECTIONAL_CODE = _factory_code("sliding_window_bidirectional_overlay", 1)
_REMAP_CODE = _factory_code("remap_positions_for_packed_sequence", mu.causal_mask_function, None)
_PACKED_CODE = _factory_code("packed_sequence_mask_function", None)


def known_pattern(mask_function: Callable) -> Optional[Pattern]:
    """The (causal, window) pattern of one of transformers' plain mask functions, else None."""
    if mask_function is mu.causal_mask_function:
        return CAUSAL
    if mask_function is mu.bidirectional_mask_function:
        return BIDIRECTIONAL
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return None
    parts = _closure_vars(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    overlay, base = parts
    code = getattr(overlay, "__code__", None)
    width = None
    if code is _SLIDING_CODE or code is _SLIDING_BIDIRECTIONAL_CODE:
        width = _closure_vars(overlay).get("sliding_window")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        return None
    if code is _SLIDING_CODE and base is mu.causal_mask_function:
        return True, (width - 1, 0)  # kv > q - w  <=>  kv >= q - (w - 1)
    if code is _SLIDING_BIDIRECTIONAL_CODE and base is mu.bidirectional_mask_function:
        return False, (width, width)  # |q - kv| <= w
    return None


def packed_pattern(mask_function: Callable) -> Optional[Tuple[Pattern, Tensor]]:
    """``(pattern, packed_sequence_mask)`` when ``mask_function`` is transformers' packed-sequence mask over a
    plain pattern (built from ``position_ids`` when there is no attention mask and no cache), else None."""
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return None
    parts = _closure_vars(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    remap, packed = parts
    if getattr(remap, "__code__", None) is not _REMAP_CODE or getattr(packed, "__code__", None) is not _PACKED_CODE:
        return None
    pattern = known_pattern(_closure_vars(remap).get("mask_function"))
    segments = _closure_vars(packed).get("packed_sequence_mask")
    if pattern is None or not isinstance(segments, Tensor) or segments.dim() != 2:
        return None
    return pattern, segments


def _packed_plan(batch: int, length: int, pattern: Pattern, segments: Tensor) -> SigmoidAttentionMask:
    """One varlen sequence per packed segment, with fixed shapes (no host sync: fine under torch.compile).

    transformers starts a segment wherever ``position_ids`` does not increase by exactly 1, so positions
    within a segment are consecutive and its causal / sliding-window mask is the segment's own. Every row
    ``b`` gets ``length`` sequence slots (most of them empty); ``length`` bounds every sequence.
    """
    device = segments.device
    total = batch * length
    sid = (segments.to(torch.long) + torch.arange(batch, device=device).unsqueeze(1) * length).reshape(-1)
    counts = torch.zeros(total, dtype=torch.int32, device=device).scatter_add_(
        0, sid, torch.ones(total, dtype=torch.int32, device=device))
    cu = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    rows = torch.arange(total, device=device)
    return SigmoidAttentionMask(batch, length, length, pattern[0], pattern[1], q_rows=rows, k_rows=rows,
                                cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=length, max_seqlen_k=length,
                                note="packed sequences")


# ---------------------------------------------------------------- dense plans

def _dense(batch: int, lq: int, lk: int, pattern: Pattern, seqused: Union[None, int, Tensor] = None,
           device=None, note: str = "") -> SigmoidAttentionMask:
    if seqused is not None:
        if isinstance(seqused, Tensor):
            seqused = seqused.to(device=device, dtype=torch.int32).reshape(-1).expand(batch).contiguous()
        else:
            seqused = torch.full((batch,), int(seqused), dtype=torch.int32, device=device)
    return SigmoidAttentionMask(batch, lq, lk, pattern[0], pattern[1], seqused_k=seqused, note=note)


def _dense_plan(batch: int, lq: int, lk: int, q_offset: Union[int, Tensor], kv_offset: int, pattern: Pattern,
                padding: Optional[Tensor], device) -> Optional[SigmoidAttentionMask]:
    """A dense plan when the mask is exactly ``pattern`` over the keys, else None (then: materialise)."""
    causal, (left, right) = pattern
    windowed = left >= 0 or (not causal and right >= 0)
    tensor_offset = isinstance(q_offset, Tensor)
    tail = (not tensor_offset) and q_offset + lq == kv_offset + lk
    # Keys after the last query cannot be seen through a causal mask; only those before it matter.
    if padding is not None:
        if is_tracing(padding):  # reading the padding mask would break the graph: materialise instead
            return None
        if causal:
            end = kv_offset + lk if tail else int(q_offset) + lq
            seen = padding[:, kv_offset:end]
        else:
            seen = padding[:, kv_offset:kv_offset + lk]
        if not bool(seen.all()):
            return None
    if tail:
        return _dense(batch, lq, lk, pattern, device=device)
    if causal:
        # Static cache: queries sit at q_offset..q_offset+lq-1 and the slots after them are empty. Each
        # row then attends to its first q_offset+lq-kv_offset keys, the queries being their tail.
        used = q_offset + lq - kv_offset
        if not tensor_offset and not 0 < used <= lk:
            raise MaskNotSupported(f"queries at positions {q_offset}..{q_offset + lq - 1} do not fall within the "
                                   f"{lk} keys starting at {kv_offset}")
        return _dense(batch, lq, lk, pattern, seqused=used, device=device, note="static cache")
    if not windowed:  # bidirectional without a window: every key, wherever the queries are
        return _dense(batch, lq, lk, pattern, device=device)
    return None


# ---------------------------------------------------------------- varlen plans, verified against the dense mask

def _ranks(valid: Tensor, sid: Tensor, num: int) -> Tuple[Tensor, Tensor]:
    """Rank of each valid element within its sequence (flattened order), and the per-sequence counts."""
    flat_valid, flat_sid = valid.reshape(-1), sid.reshape(-1)
    position = flat_valid.long().cumsum(0) - 1
    counts = torch.bincount(flat_sid[flat_valid], minlength=num)
    start = F.pad(counts.cumsum(0), (1, 0))[:-1]
    rank = position - start[flat_sid.clamp(min=0)]
    return rank.view_as(sid), counts


def _expected(sid_q: Tensor, sid_k: Tensor, rank_q: Tensor, rank_k: Tensor, n_q: Tensor, n_k: Tensor,
              pattern: Pattern) -> Tensor:
    """The (B, Lq, Lk) mask a bottom-right aligned varlen call computes for these sequences."""
    causal, (left, right) = pattern
    aligned = rank_q + (n_k - n_q)[sid_q.clamp(min=0)]  # the key position each query is aligned with
    ok = (sid_q.unsqueeze(2) == sid_k.unsqueeze(1)) & (sid_q >= 0).unsqueeze(2)
    if causal:
        right = 0
    if right >= 0:
        ok &= rank_k.unsqueeze(1) <= (aligned + right).unsqueeze(2)
    if left >= 0:
        ok &= rank_k.unsqueeze(1) >= (aligned - left).unsqueeze(2)
    return ok


def _structural(lq: int, lk: int, pattern: Pattern, device) -> Tensor:
    """The (Lq, Lk) mask of ``pattern`` for one sequence, queries aligned with the last keys."""
    causal, (left, right) = pattern
    aligned = torch.arange(lq, device=device).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk, device=device).unsqueeze(0)
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    right = 0 if causal else right
    if right >= 0:
        ok &= j <= aligned + right
    if left >= 0:
        ok &= j >= aligned - left
    return ok


def _try_sequences(dense: Tensor, q_valid: Tensor, k_valid: Tensor, sid_q: Tensor, sid_k: Tensor,
                   candidates: List[Pattern], note: str) -> Optional[SigmoidAttentionMask]:
    B, lq, lk = dense.shape
    sid_q = torch.where(q_valid, sid_q, -1)
    sid_k = torch.where(k_valid, sid_k, -1)
    used = torch.unique(torch.cat([sid_q[q_valid], sid_k[k_valid]]))  # sorted
    # Renumber 0..num-1 keeping the order (rows are grouped by sequence in flattened order). With no
    # token at all, one empty sequence keeps the varlen call well-formed (its output is all zeros).
    num = max(used.numel(), 1)
    if used.numel():
        sid_q = torch.where(q_valid, torch.searchsorted(used, sid_q.clamp(min=0)), -1)
        sid_k = torch.where(k_valid, torch.searchsorted(used, sid_k.clamp(min=0)), -1)
    rank_q, n_q = _ranks(q_valid, sid_q, num)
    rank_k, n_k = _ranks(k_valid, sid_k, num)
    for pattern in candidates:
        expected = _expected(sid_q, sid_k, rank_q, rank_k, n_q, n_k, pattern)
        # Rows of queries outside every sequence get 0 from the kernel: exact when they see no key, and
        # what padded query positions get (their outputs are padding).
        if bool(((expected == dense) | ~q_valid.unsqueeze(2)).all()):
            device = dense.device
            return SigmoidAttentionMask(
                B, lq, lk, pattern[0], pattern[1],
                q_rows=q_valid.reshape(-1).nonzero().squeeze(1), k_rows=k_valid.reshape(-1).nonzero().squeeze(1),
                cu_seqlens_q=F.pad(n_q.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
                cu_seqlens_k=F.pad(n_k.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
                max_seqlen_q=int(n_q.max()), max_seqlen_k=int(n_k.max()), note=note)
    return None


def plan_from_dense(dense: Tensor, candidates: List[Pattern], *, q_valid: Optional[Tensor] = None,
                    k_valid: Optional[Tensor] = None, allow_segments: bool = False) -> SigmoidAttentionMask:
    """Find a varlen call that computes exactly the boolean ``dense`` mask ``(B, Lq, Lk)`` (True: attend).

    ``q_valid``/``k_valid`` (``(B, Lq)``/``(B, Lk)``) mark the non-padding tokens when known; padded
    query positions then get zeros. One sequence per batch row is tried first, then (for square
    self-attention, ``allow_segments``) packed segments, i.e. rows split where a query cannot see its
    predecessor. Raises :class:`MaskNotSupported` when no candidate pattern matches element by element.
    """
    B, lq, lk = dense.shape
    device = dense.device
    sees = dense.any(2)
    q_ok = sees if q_valid is None else (q_valid & sees)
    # Keys after the last key any query sees are empty (e.g. static-cache slots): not part of the sequence.
    seen_k = (dense & q_ok.unsqueeze(2)).any(1)
    positions = torch.arange(lk, device=device)
    last = torch.where(seen_k, positions, -1).amax(1, keepdim=True) if lk else seen_k.long()
    k_ok = positions <= last
    if k_valid is not None:
        k_ok &= k_valid
    rows = torch.arange(B, device=device)
    plan = _try_sequences(dense, q_ok, k_ok, rows.unsqueeze(1).expand(B, lq), rows.unsqueeze(1).expand(B, lk),
                          candidates, "padding")
    if plan is None and allow_segments and lq == lk and lq > 1:
        diag = torch.diagonal(dense, offset=-1, dim1=1, dim2=2)  # query i sees key i - 1
        start = F.pad(~diag, (1, 0), value=True)
        sid = rows.unsqueeze(1) * lq + start.long().cumsum(1) - 1
        plan = _try_sequences(dense, q_ok, k_ok, sid, sid, candidates, "packed sequences")
    if plan is None:
        tried = ", ".join(_pattern_name(p) for p in candidates)
        raise MaskNotSupported(
            f"the attention mask (batch {B}, {lq} queries, {lk} keys) is not {tried} over padded or packed "
            "sequences, so no accel sigmoid attention call computes it exactly (e.g. chunked attention through a "
            "KV cache, bidirectional image-token blocks, or an arbitrary custom 4-D mask)")
    return plan


def _pattern_name(pattern: Pattern) -> str:
    causal, (left, right) = pattern
    if left < 0 and (causal or right < 0):
        return "causal" if causal else "full (bidirectional)"
    return f"{'causal' if causal else 'bidirectional'} sliding window {(left, 0 if causal else right)}"


def _candidates(known: Optional[Pattern], local_size: Optional[int]) -> List[Pattern]:
    if known is not None:
        return [known]
    out = [CAUSAL, BIDIRECTIONAL]
    if isinstance(local_size, int) and local_size > 0:
        out += [(True, (local_size - 1, 0)), (False, (local_size, local_size))]
    return out


# ---------------------------------------------------------------- the mask interface function

def sigmoid_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Union[int, Tensor] = 0,
    kv_offset: int = 0,
    mask_function: Callable = mu.causal_mask_function,
    attention_mask: Optional[Tensor] = None,
    local_size: Optional[int] = None,
    use_vmap: bool = False,
    device: Union[torch.device, str] = "cpu",
    **kwargs: Any,
) -> SigmoidAttentionMask:
    """transformers' mask-interface entry point for ``attn_implementation="accel_sigmoid"``.

    Same arguments as ``transformers.masking_utils.sdpa_mask``; returns a :class:`SigmoidAttentionMask`.
    """
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    known = known_pattern(mask_function)
    if known is not None:
        plan = _dense_plan(batch_size, q_length, kv_length, q_offset, kv_offset, known, padding, device)
        if plan is not None:
            return plan
    packed = packed_pattern(mask_function) if attention_mask is None else None
    no_cache = not isinstance(q_offset, Tensor) and q_offset == kv_offset == 0 and q_length == kv_length
    if packed is not None and no_cache and packed[1].shape == (batch_size, q_length):
        return _packed_plan(batch_size, q_length, packed[0], packed[1].to(device))
    dense = mu.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device)
    if dense.shape[1] != 1:
        raise MaskNotSupported(f"a mask that differs between heads (shape {tuple(dense.shape)})")
    dense = dense[:, 0].expand(batch_size, q_length, kv_length)
    q_valid = k_valid = None
    if padding is not None:
        k_valid = padding[:, kv_offset:kv_offset + kv_length].to(dense.device)
        positions = torch.arange(q_length, device=padding.device) + q_offset
        q_valid = padding.gather(1, positions.unsqueeze(0).expand(batch_size, q_length).long()).to(dense.device)
    square = padding is None and not isinstance(q_offset, Tensor) and q_offset == 0 and kv_offset == 0
    return plan_from_dense(dense, _candidates(known, local_size), q_valid=q_valid, k_valid=k_valid,
                           allow_segments=square)


def plan_from_tensor(mask: Tensor, batch: int, lq: int, lk: int, pattern: Pattern) -> SigmoidAttentionMask:
    """A plan for a mask tensor that did not come from :func:`sigmoid_attention_mask`.

    2-D ``(B, >= L_k)``: a padding mask over the keys (1/True: token), its last ``L_k`` columns matching
    the keys and the queries being their tail, as transformers' flash-attention path reads it, combined
    with ``pattern``. 4-D ``(B or 1, 1, L_q, L_k)``: a mask as transformers' SDPA (bool, True: attend)
    or eager (float, 0: attend, large negative: masked) paths take it; any other value is an additive
    bias and raises.
    """
    if mask.dim() == 2:
        if mask.shape[0] != batch or mask.shape[1] < lk or lq > lk:
            raise MaskNotSupported(f"a 2-D padding mask must be (batch, >= {lk}) with at most {lk} queries, got "
                                   f"{tuple(mask.shape)} and {lq} queries")
        valid = mask[:, -lk:].to(torch.bool)
        dense = _structural(lq, lk, pattern, mask.device).unsqueeze(0) & valid.unsqueeze(1)
        return plan_from_dense(dense, [pattern], q_valid=valid[:, lk - lq:], k_valid=valid)
    if mask.dim() != 4:
        raise MaskNotSupported(f"attention masks must be 2-D (padding) or 4-D, got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | blocked).all()):
            raise MaskNotSupported("a float 4-D mask holds values other than 0 and large negatives: an additive "
                                   "bias, which the fused kernel cannot take")
        keep = ~blocked
    else:
        raise MaskNotSupported(f"a 4-D mask must be bool or float, got {mask.dtype}")
    if keep.shape[-2:] != (lq, lk) or keep.shape[0] not in (1, batch):
        raise MaskNotSupported(f"a 4-D mask must be ({batch} or 1, 1, {lq}, {lk}), got {tuple(mask.shape)}")
    if keep.shape[1] != 1:
        if not bool((keep == keep[:, :1]).all()):
            raise MaskNotSupported("a 4-D mask that differs between heads")
        keep = keep[:, :1]
    dense = keep[:, 0].expand(batch, lq, lk)
    candidates = [pattern] + [p for p in (CAUSAL, BIDIRECTIONAL) if p != pattern]
    return plan_from_dense(dense, candidates, allow_segments=lq == lk)
