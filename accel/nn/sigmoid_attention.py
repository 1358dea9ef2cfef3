"""Drop-in modules built on accel.ops.sigmoid_attention.

``SigmoidAttention`` is the stateless core (SDPA's ``(B, H, L, D)`` layout); ``SigmoidMultiheadAttention``
has ``nn.MultiheadAttention``'s constructor, parameters and ``state_dict`` keys and runs the fused kernel.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from accel.ops.sigmoid_attention import (
    resolve_bias,
    resolve_scale,
    resolve_window,
    sigmoid_attention,
    sigmoid_attention_varlen,
)

Bias = Union[None, float, Tensor]

_MHA_PARAMETERS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                   "out_proj.weight", "out_proj.bias", "bias_k", "bias_v")


# ---------------------------------------------------------------- module arguments
# The op checks shapes, ranges and the window when it runs; a module only converts its arguments
# (accel.ops.sigmoid_attention's resolve_*) and keeps what the op cannot see: autograd.

def _fixed(t: Any, what: str, owner: str) -> Any:
    """A bias or slopes tensor kept by the module: the kernel does not differentiate it."""
    if isinstance(t, Tensor) and t.requires_grad:
        raise ValueError(f"{owner}: {what} must not require grad (the kernel does not differentiate it); "
                         f"pass {what}.detach()")
    return t


def _describe_bias(bias: Bias) -> str:
    if bias is None:
        return "-log(L_k)"
    if isinstance(bias, Tensor):
        return f"per-head tensor {tuple(bias.shape)}"
    return f"{bias:g}"


# ---------------------------------------------------------------- SigmoidAttention

class SigmoidAttention(nn.Module):
    """``O = sigmoid(scale * Q K^T + bias + alibi) V`` on ``(B, H, L, D)`` tensors, the layout of
    ``F.scaled_dot_product_attention``; no ``(L_q, L_k)`` matrix is stored.

    Stateless: the constructor holds defaults that ``forward`` may override per call. ``bias`` is
    ``None`` (the paper's ``-log(L_k)``), a float, or a fixed per-head ``(H_q,)`` tensor (kept as a
    non-persistent buffer, so ``state_dict`` stays empty and ``.to()`` moves it); ``alibi_slopes`` is
    ``(H_q,)`` or None. ``causal`` masks keys after the query, aligned bottom-right as in
    flash-attention (query ``i`` sits at key ``i + L_k - L_q``); ``window=(left, right)`` keeps keys
    within that many positions of the aligned one (-1: unbounded). GQA/MQA: ``H_q`` a multiple of ``H_kv``.
    """

    def __init__(self, *, bias: Bias = None, scale: Optional[float] = None, causal: bool = False,
                 window: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None):
        super().__init__()
        owner = type(self).__name__
        self.scale = resolve_scale(scale)
        self.causal = bool(causal)
        self.window = resolve_window(window)
        bias = _fixed(resolve_bias(bias), "a tensor bias", owner)
        if isinstance(bias, Tensor):
            self.register_buffer("bias", bias, persistent=False)
        else:
            self.bias = bias
        self.register_buffer("alibi_slopes", _fixed(alibi_slopes, "alibi_slopes", owner), persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: Optional[bool] = None,
                window: Optional[Tuple[int, int]] = None, scale: Optional[float] = None) -> Tensor:
        """``q``: ``(B, H_q, L_q, D)``, ``k``/``v``: ``(B, H_kv, L_k, D)`` -> ``(B, H_q, L_q, D)``.

        ``causal``, ``window`` and ``scale`` override the constructor's defaults for this call.
        """
        causal = self.causal if causal is None else bool(causal)
        return sigmoid_attention(
            q, k, v, bias=self.bias, scale=self.scale if scale is None else scale, causal=causal,
            window=self.window if window is None else window, alibi_slopes=self.alibi_slopes)

    def extra_repr(self) -> str:
        s = f"bias={_describe_bias(self.bias)}, scale={'1/sqrt(D)' if self.scale is None else f'{self.scale:g}'}"
        s += f", causal={self.causal}"
        if self.window != (-1, -1):
            s += f", window={self.window}"
        if self.alibi_slopes is not None:
            s += ", alibi=True"
        return s


# ---------------------------------------------------------------- masks of nn.MultiheadAttention's forward

def _blocked(mask: Tensor, name: str) -> Tensor:
    """A boolean "this key is masked out" tensor from MHA's mask conventions (bool: True masks; float: added)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"SigmoidMultiheadAttention: {name} must be bool or float, got {mask.dtype}")
    blocked = torch.isneginf(mask)
    if not bool(((mask == 0) | blocked).all()):
        raise ValueError(
            f"SigmoidMultiheadAttention: a float {name} may only hold 0 (attend) and -inf (masked); other values are "
            "an additive bias, which the fused kernel cannot take (it has a scalar or per-head bias only)")
    return blocked


def _attn_mask_is_causal(attn_mask: Tensor, batch: int, heads: int, lq: int, lk: int) -> bool:
    """Whether ``attn_mask`` masks nothing (False) or exactly the bottom-right causal pattern (True); else raise.

    Reading the mask's values needs a host sync; pass ``is_causal=True`` without a mask instead
    (also under ``torch.compile``).
    """
    if attn_mask.shape not in ((lq, lk), (batch * heads, lq, lk)):
        raise ValueError(f"SigmoidMultiheadAttention: attn_mask must have shape ({lq}, {lk}) or "
                         f"({batch * heads}, {lq}, {lk}), got {tuple(attn_mask.shape)}")
    blocked = _blocked(attn_mask, "attn_mask")
    if not bool(blocked.any()):
        return False
    i = torch.arange(lq, device=blocked.device).unsqueeze(1) + (lk - lq)
    causal = torch.arange(lk, device=blocked.device).unsqueeze(0) > i
    if bool((blocked == causal).all()):
        return True
    raise ValueError(
        "SigmoidMultiheadAttention: attn_mask is neither empty nor the causal mask (key j masked for query i exactly "
        f"when j > i + L_k - L_q); the fused kernel supports causal, sliding-window and key-padding masks only. "
        "Pass is_causal=True and/or key_padding_mask instead of an arbitrary attn_mask")


def _padded_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, causal: bool, **op_kwargs) -> Tensor:
    """Attention with per-batch valid keys through the varlen kernel, exactly as the dense masked formula.

    ``q``: ``(B, L, H, D)``, ``k``/``v``: ``(B, S, H_kv, D)``, ``valid``: ``(B, S)`` bool. The default bias
    counts the valid keys of each sequence, so padding does not change a sequence's output. Non-causal:
    any padding pattern (the valid keys are packed, order kept). Causal: ``L == S`` and right padding;
    query rows at padded positions see every valid key (causal AND not padded).
    """
    B, L, H, D = q.shape
    S = k.shape[1]
    flat_valid = valid.reshape(-1)
    key_rows = flat_valid.nonzero().squeeze(1)
    counts = valid.sum(1)
    cu_k = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    max_k = int(counts.max()) if B else 0
    qf = q.reshape(B * L, H, D)
    kf = k.reshape(B * S, k.shape[2], D).index_select(0, key_rows)
    vf = v.reshape(B * S, v.shape[2], D).index_select(0, key_rows)
    if not causal:
        cu_q = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=q.device)
        return sigmoid_attention_varlen(qf, kf, vf, cu_q, cu_k, L, max_k, causal=False, **op_kwargs).view(B, L, H, D)
    # Causal with right padding: the valid queries (i < n_b) are the tail of the valid keys, so the
    # bottom-right causal varlen call is exact for them; queries at padded positions see all n_b keys.
    pad_rows = (~flat_valid).nonzero().squeeze(1)
    out_valid = sigmoid_attention_varlen(qf.index_select(0, key_rows), kf, vf, cu_k, cu_k, max_k, max_k,
                                         causal=True, **op_kwargs)
    out = qf.new_zeros(qf.shape).index_copy(0, key_rows, out_valid)
    if pad_rows.numel():
        pad_counts = L - counts
        cu_pad = F.pad(pad_counts.cumsum(0), (1, 0)).to(torch.int32)
        out_pad = sigmoid_attention_varlen(qf.index_select(0, pad_rows), kf, vf, cu_pad, cu_k, int(pad_counts.max()),
                                           max_k, causal=False, **op_kwargs)
        out = out.index_copy(0, pad_rows, out_pad)
    return out.view(B, L, H, D)


# ---------------------------------------------------------------- SigmoidMultiheadAttention

class SigmoidMultiheadAttention(nn.Module):
    """Sigmoid multi-head attention with ``nn.MultiheadAttention``'s constructor, parameters and ``state_dict``.

    ``state_dict`` is interchangeable with ``nn.MultiheadAttention`` and with
    ``accel.reference.SigmoidMultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight`` when
    ``kdim``/``vdim`` differ, ``in_proj_bias``, ``out_proj.*``, ``bias_k``/``bias_v``). Sigmoid options
    (keyword-only): ``attn_bias`` (None: ``-log(L_k)`` with ``L_k`` the attended keys, including the
    ``add_bias_kv``/``add_zero_attn`` ones and excluding padded ones; a float; or a fixed ``(num_heads,)``
    tensor), ``scale`` (default ``1/sqrt(head_dim)``), ``window`` and ``alibi_slopes`` (``(num_heads,)``).

    ``forward`` follows ``nn.MultiheadAttention`` and returns ``(output, None)``: attention weights are
    never materialised, so ``need_weights=True`` raises (note the default here is ``need_weights=False``).
    Differences, each an error rather than a silent change:

    - ``dropout > 0`` raises in training mode: the kernel has no attention dropout.
    - ``is_causal=True`` works without ``attn_mask`` and is aligned bottom-right (flash-attention);
      ``attn_mask`` is accepted only when it masks nothing or exactly that causal pattern.
    - ``key_padding_mask``: any pattern without ``is_causal``; with it, right padding and ``L == S``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 attn_bias: Bias = None, scale: Optional[float] = None, window: Tuple[int, int] = (-1, -1),
                 alibi_slopes: Optional[Tensor] = None):
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"SigmoidMultiheadAttention: embed_dim and num_heads must be > 0, got {embed_dim}, "
                             f"{num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"SigmoidMultiheadAttention: embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"SigmoidMultiheadAttention: dropout must be in [0, 1], got {dropout}")
        super().__init__()
        owner = type(self).__name__
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.scale = resolve_scale(scale)
        self.window = resolve_window(window)
        # Parameters in nn.MultiheadAttention's order, so state_dict keys and their order match.
        if self.kdim == embed_dim and self.vdim == embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        attn_bias = _fixed(resolve_bias(attn_bias), "a tensor attn_bias", owner)
        if isinstance(attn_bias, Tensor):  # non-persistent: state_dict keys stay nn.MultiheadAttention's
            self.register_buffer("attn_bias", attn_bias, persistent=False)
        else:
            self.attn_bias = attn_bias
        self.register_buffer("alibi_slopes", _fixed(alibi_slopes, "alibi_slopes", owner), persistent=False)
        self._reset_parameters()

    # nn.TransformerEncoder(Layer) reads this flag and, when it is True in eval mode, runs its own fused
    # *softmax* kernel on self_attn's weights instead of calling self_attn. False keeps that fast path
    # off, so a SigmoidMultiheadAttention placed there is always called. (Which projection weights exist
    # is told by in_proj_weight being None or not.)
    @property
    def _qkv_same_embed_dim(self) -> bool:
        return False

    def _reset_parameters(self) -> None:
        if self.in_proj_weight is not None:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    # ------------------------------------------------------------ construction from other modules

    @classmethod
    def from_parts(cls, options: Mapping[str, Any], parameters: Mapping[str, Optional[Tensor]], *,
                   training: bool = True, **extra) -> "SigmoidMultiheadAttention":
        """Build one on the meta device from constructor ``options`` and share ``parameters`` (by this
        class's parameter names, e.g. ``"in_proj_weight"``, ``"out_proj.weight"``); nothing is copied."""
        owner = cls.__name__
        options = dict(options)
        unknown = set(parameters) - set(_MHA_PARAMETERS)
        if unknown:
            raise ValueError(f"{owner}: unknown parameter name(s) {sorted(unknown)}; expected some of "
                             f"{_MHA_PARAMETERS}")
        given = [p for p in parameters.values() if p is not None]
        if not given:
            raise ValueError(f"{owner}: no parameters given")
        options.setdefault("dtype", given[0].dtype)
        new = cls(**options, device="meta", **extra)
        for name, tensor in parameters.items():
            owner_module, _, attr = name.rpartition(".")
            target = new.get_submodule(owner_module) if owner_module else new
            current = getattr(target, attr)
            if (current is None) != (tensor is None):
                raise ValueError(f"{owner}: parameter {name!r} is {'missing' if tensor is None else 'unexpected'} "
                                 f"for options {options}")
            if tensor is None:
                continue
            if tensor.shape != current.shape:
                raise ValueError(f"{owner}: parameter {name!r} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(current.shape)} for options {options}")
            if not isinstance(tensor, nn.Parameter):
                raise TypeError(f"{owner}: {name!r} must be an nn.Parameter to be shared, got {type(tensor).__name__}")
            setattr(target, attr, tensor)
        left = [n for n, p in new.named_parameters() if p.is_meta]
        if left:
            raise ValueError(f"{owner}: no tensor given for parameter(s) {left}")
        new.train(training)
        return new

    @classmethod
    def from_module(cls, module: nn.Module) -> "SigmoidMultiheadAttention":
        """Build from ``accel.reference.SigmoidMultiheadAttention`` (same maths) or ``nn.MultiheadAttention``
        (a softmax -> sigmoid conversion: the outputs change), sharing the parameters (no copy).

        The result is called like ``nn.MultiheadAttention`` (``(output, None)``); ``accel.patch`` instead
        builds a replacement that keeps the replaced module's own calling convention.
        """
        from accel.reference import SigmoidMultiheadAttention as Reference

        if isinstance(module, Reference):
            options, parameters = reference_options(module), mha_parameters(module)
        elif isinstance(module, nn.MultiheadAttention):
            options = dict(embed_dim=module.embed_dim, num_heads=module.num_heads, dropout=module.dropout,
                           bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                           add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                           batch_first=module.batch_first)
            parameters = mha_parameters(module)
        else:
            raise TypeError(f"{cls.__name__}.from_module expects accel.reference.SigmoidMultiheadAttention or "
                            f"nn.MultiheadAttention, got {type(module).__name__}")
        return cls.from_parts(options, parameters, training=module.training)

    # ------------------------------------------------------------ forward

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, None]:
        """Like ``nn.MultiheadAttention.forward``; returns ``(output, None)``.

        ``query``: ``(B, L, E)`` if ``batch_first`` else ``(L, B, E)``, or unbatched ``(L, E)``; ``key``/``value``
        likewise with ``S`` rows and ``kdim``/``vdim`` features. ``key_padding_mask``: ``(B, S)`` (bool: True
        is padding; float: 0 or -inf). ``attn_mask``: ``(L, S)`` or ``(B * num_heads, L, S)``, empty or causal.
        """
        if need_weights:
            raise NotImplementedError(
                "SigmoidMultiheadAttention never materialises the attention weights (the kernel does not store the "
                "(L, S) matrix); call it with need_weights=False")
        return self.attend(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                           is_causal=is_causal), None

    def attend(self, query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Optional[Tensor] = None,
               attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """The attention output alone (what ``forward`` returns first)."""
        name = type(self).__name__
        if self.training and self.dropout > 0:
            raise NotImplementedError(
                f"{name}: attention dropout (dropout={self.dropout}) is not supported in training mode: the fused "
                "sigmoid attention kernel has no dropout. Construct it with dropout=0.0, or call .eval()")
        for t, what in ((query, "query"), (key, "key"), (value, "value")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
            if t.is_nested:
                raise NotImplementedError(f"{name}: nested tensors are not supported; pad and pass key_padding_mask")
        unbatched = query.dim() == 2
        if unbatched:
            if key.dim() != 2 or value.dim() != 2:
                raise ValueError(f"{name}: unbatched query (L, E) needs unbatched key and value (S, E_k), got "
                                 f"{tuple(key.shape)} and {tuple(value.shape)}")
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"{name}: query, key and value must be 3-D (batched) or 2-D (unbatched), got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        if E != self.embed_dim or key.shape[2] != self.kdim or value.shape[2] != self.vdim:
            raise ValueError(f"{name}: expected feature sizes query {self.embed_dim}, key {self.kdim}, value "
                             f"{self.vdim}; got {E}, {key.shape[2]}, {value.shape[2]}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"{name}: key and value must have the same batch and length, and the query's batch; got "
                             f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} "
                             "(batch first)")

        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        q, k, v = q.view(B, L, H, D), k.view(B, S, H, D), v.view(B, S, H, D)

        causal = bool(is_causal)
        if attn_mask is not None:
            mask_causal = _attn_mask_is_causal(attn_mask, B, H, L, S)
            if is_causal and not mask_causal:
                raise ValueError(f"{name}: is_causal=True but attn_mask masks nothing; pass one consistent description")
            causal = mask_causal
        valid = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, S):
                raise ValueError(f"{name}: key_padding_mask must have shape (B, S) = ({B}, {S}), got "
                                 f"{tuple(key_padding_mask.shape)}")
            valid = ~_blocked(key_padding_mask, "key_padding_mask")
            if bool(valid.all()):
                valid = None

        extra = []
        if self.bias_k is not None:
            extra.append((self.bias_k.view(1, 1, H, D).expand(B, 1, H, D),
                          self.bias_v.view(1, 1, H, D).expand(B, 1, H, D)))
        if self.add_zero_attn:
            zeros = k.new_zeros(B, 1, H, D)
            extra.append((zeros, zeros))
        if extra:
            if causal:
                raise NotImplementedError(
                    f"{name}: add_bias_kv/add_zero_attn append keys after the sequence, which a bottom-right aligned "
                    "causal mask would hide from all but the last queries; causal attention with them is not supported")
            k = torch.cat([k] + [ek for ek, _ in extra], 1)
            v = torch.cat([v] + [ev for _, ev in extra], 1)
            if valid is not None:
                valid = F.pad(valid, (0, len(extra)), value=True)

        op_kwargs = dict(bias=self.attn_bias, scale=self.scale, alibi_slopes=self.alibi_slopes)
        if valid is None:
            out = sigmoid_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                    window=self.window, **op_kwargs).transpose(1, 2)
        else:
            if self.window != (-1, -1):
                raise NotImplementedError(f"{name}: key_padding_mask with a sliding window is not supported")
            if causal:
                right_padded = bool((valid[:, :-1] >= valid[:, 1:]).all())
                if L != S or not right_padded:
                    raise NotImplementedError(
                        f"{name}: key_padding_mask with is_causal=True needs self-attention (L == S, got L={L}, S={S}) "
                        "and right padding (each row's valid keys first)")
            out = _padded_attention(q, k, v, valid, causal, **op_kwargs)
        out = self.out_proj(out.reshape(B, L, E))
        if unbatched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(E)
        if self.in_proj_weight is not None:
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(E, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.split(E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        s += f", batch_first={self.batch_first}, attn_bias={_describe_bias(self.attn_bias)}"
        if self.scale is not None:
            s += f", scale={self.scale:g}"
        if self.window != (-1, -1):
            s += f", window={self.window}"
        if self.alibi_slopes is not None:
            s += ", alibi=True"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s


class AdaptedSigmoidMultiheadAttention(SigmoidMultiheadAttention):
    """A ``SigmoidMultiheadAttention`` called with the calling convention of the module it replaced.

    ``accel.patch`` swaps it in for a sigmoid attention module of another class (see
    ``accel.patching.sigmoid_attention_rule``): ``forward(*args, **kwargs)`` runs
    ``call_convention(self, *args, **kwargs)``, which maps the replaced module's arguments onto
    :meth:`attend` and returns what the replaced module's ``forward`` returned. For example the
    replacement of ``accel.reference.SigmoidMultiheadAttention`` is called as
    ``m(query, key, value, is_causal=False)`` and returns a tensor, like the reference.
    """

    def __init__(self, *args, call_convention: Callable[..., Any], replaces: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        if not callable(call_convention):
            raise TypeError(f"{type(self).__name__}: call_convention must be callable, got {call_convention!r}")
        self.call_convention = call_convention
        self.replaces = replaces

    def forward(self, *args, **kwargs):
        return self.call_convention(self, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", replaces={self.replaces}" if self.replaces else "")


# ---------------------------------------------------------------- reading other modules (used by patch rules)

def mha_parameters(module: nn.Module) -> dict:
    """The ``nn.MultiheadAttention``-named parameters of ``module`` (None where it has none)."""
    out = {}
    for name in _MHA_PARAMETERS:
        owner, _, attr = name.rpartition(".")
        target = getattr(module, owner, None) if owner else module
        out[name] = getattr(target, attr, None) if target is not None else None
    return out


def reference_options(module: nn.Module) -> dict:
    """Constructor options equivalent to an ``accel.reference.SigmoidMultiheadAttention``."""
    attn_bias = module.attn_bias
    if isinstance(attn_bias, Tensor):  # the reference takes any tensor with one value per head
        attn_bias = attn_bias.reshape(-1)
    return dict(embed_dim=module.embed_dim, num_heads=module.num_heads, dropout=module.dropout,
                bias=module.in_proj_bias is not None, batch_first=module.batch_first, attn_bias=attn_bias)


def call_like_reference(fused: SigmoidMultiheadAttention, query: Tensor, key: Tensor, value: Tensor, *,
                        is_causal: bool = False) -> Tensor:
    """``accel.reference.SigmoidMultiheadAttention``'s convention: ``(query, key, value, *, is_causal)`` -> tensor."""
    return fused.attend(query, key, value, is_causal=is_causal)


def call_like_mha(fused: SigmoidMultiheadAttention, *args, **kwargs):
    """``nn.MultiheadAttention``'s convention (``forward`` unchanged)."""
    return SigmoidMultiheadAttention.forward(fused, *args, **kwargs)
