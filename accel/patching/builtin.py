"""Rules that ship with accel itself (third-party model families come through plugins)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from accel.patching.rules import ClassSpec, Rule

# Grouped convs with more input channels per group than this stay with nn.Conv1d.
MAX_CHANNELS_PER_GROUP = 16

def op_reason(op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why accel cannot run ``op`` (an op's capability record name) on ``device`` in ``dtype`` with this
    build and machine, or None. Reads the op's capability record (imported lazily: it needs accel._C)."""
    from accel import _ext

    if not _ext.available():
        err = str(_ext.load_error()).strip().splitlines()
        return f"accel native extension not built: {err[0] if err else 'unknown error'}"
    from accel.ops import capability

    return capability(op).unsupported_reason(device, dtype)


def _conv1d_check(conv: nn.Module) -> Optional[str]:
    assert isinstance(conv, nn.Conv1d)
    if conv.stride[0] != 1:
        return f"stride {conv.stride[0]} != 1"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} is not zeros"
    if conv.dilation[0] == 1 and conv.groups != conv.in_channels:
        return "dense undilated conv: nn.Conv1d (oneDNN) is already the fastest kernel for it"
    per_group = conv.in_channels // conv.groups
    if conv.groups != conv.in_channels and per_group > MAX_CHANNELS_PER_GROUP:
        # measured (docs/benchmarks.md): accel's GEMM path is ~0.7x oneDNN for dense convs, and
        # its CUDA kernel has no tensor-core path; it wins for depthwise and narrow groups.
        return (f"{per_group} input channels per group > {MAX_CHANNELS_PER_GROUP}: nn.Conv1d's GEMM-based "
                "kernel is faster for wide groups")
    dtype = conv.weight.dtype
    if conv.bias is not None and conv.bias.dtype != dtype:
        return f"bias dtype {conv.bias.dtype} differs from weight dtype {dtype}"
    return op_reason("dilated_conv1d", conv.weight.device, dtype)


def _conv1d_build(conv: nn.Module) -> nn.Module:
    from accel.nn import DilatedConv1d  # lazy: importing accel.nn needs the native extension

    assert isinstance(conv, nn.Conv1d)
    return DilatedConv1d.from_module(conv)


CONV1D = Rule(
    name="conv1d->DilatedConv1d",
    op="dilated_conv1d",
    classes=(nn.Conv1d,),
    check=_conv1d_check,
    build=_conv1d_build,
    description="dilated or depthwise nn.Conv1d (stride 1, zero padding) -> accel.nn.DilatedConv1d",
)


# ---------------------------------------------------------------- sigmoid attention


def _mha_parameters(module: nn.Module) -> Mapping[str, Any]:
    from accel.nn.sigmoid_attention import mha_parameters  # lazy: accel.nn needs the native extension

    return mha_parameters(module)


def _call_like_mha(fused: nn.Module, *args, **kwargs):
    from accel.nn.sigmoid_attention import call_like_mha

    return call_like_mha(fused, *args, **kwargs)


@dataclass(frozen=True)
class SigmoidAttentionAdapter:
    """How to read a module class as sigmoid multi-head attention, for :func:`sigmoid_attention_rule`.

    - ``options(m)``: ``accel.nn.SigmoidMultiheadAttention`` constructor arguments equivalent to ``m``
      (``embed_dim``, ``num_heads``, ``bias``, ``batch_first``, ``kdim``/``vdim``, ``add_bias_kv``,
      ``add_zero_attn``, ``dropout``, ``attn_bias``, ``scale``, ``window``, ``alibi_slopes``); dtype and
      device come from the parameters.
    - ``parameters(m)``: ``m``'s parameters by ``SigmoidMultiheadAttention``'s names (``"in_proj_weight"``,
      or ``"q_proj_weight"``/``"k_proj_weight"``/``"v_proj_weight"``, ``"in_proj_bias"``, ``"out_proj.weight"``,
      ``"out_proj.bias"``, ``"bias_k"``, ``"bias_v"``); they are shared, not copied. Default: the same names
      as ``nn.MultiheadAttention``.
    - ``call(fused, *args, **kwargs)``: ``m``'s calling convention: maps the arguments ``m.forward`` takes
      onto ``fused.attend(query, key, value, key_padding_mask=, attn_mask=, is_causal=)`` and returns
      what ``m.forward`` returns. Default: called like ``nn.MultiheadAttention``.
    - ``check(m)``: why ``m`` must be left alone (e.g. a configuration the adapter cannot map exactly), or None.

    The replacement must compute what ``m`` computes; anything the adapter cannot map exactly belongs in ``check``.
    """

    options: Callable[[nn.Module], Mapping[str, Any]]
    parameters: Callable[[nn.Module], Mapping[str, Any]] = _mha_parameters
    call: Callable[..., Any] = _call_like_mha
    check: Optional[Callable[[nn.Module], Optional[str]]] = None


def _attention_check(adapter: SigmoidAttentionAdapter, module: nn.Module) -> Optional[str]:
    if adapter.check is not None:
        reason = adapter.check(module)
        if reason:
            return reason
    options = adapter.options(module)
    dropout = float(options.get("dropout", 0.0) or 0.0)
    if dropout > 0:
        return f"attention dropout {dropout:g} > 0: the fused sigmoid attention kernel has no dropout"
    for name in ("attn_bias", "alibi_slopes"):
        value = options.get(name)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return f"{name} is a learnable tensor: the fused kernel does not differentiate it"
    tensors = [t for t in adapter.parameters(module).values() if t is not None]
    if not tensors:
        return "no projection parameters found"
    dtype, device = tensors[0].dtype, tensors[0].device
    if any(t.dtype != dtype for t in tensors):
        return "its parameters have different dtypes"
    return op_reason("sigmoid_attention", device, dtype)


def _attention_build(adapter: SigmoidAttentionAdapter, module: nn.Module) -> nn.Module:
    from accel.nn.sigmoid_attention import AdaptedSigmoidMultiheadAttention

    return AdaptedSigmoidMultiheadAttention.from_parts(
        adapter.options(module), adapter.parameters(module), training=module.training,
        call_convention=adapter.call, replaces=type(module).__name__)


def sigmoid_attention_rule(
    classes: Union[ClassSpec, Sequence[ClassSpec]],
    adapter: SigmoidAttentionAdapter,
    *,
    name: Optional[str] = None,
    subclasses: bool = False,
    description: str = "",
) -> Rule:
    """A patch rule that replaces modules of ``classes`` (sigmoid attention layers of another library) by
    ``accel.nn.AdaptedSigmoidMultiheadAttention`` running the fused kernel, per instance.

    For plugins: declare a module class as sigmoid attention with an adapter saying how to read it, and
    add the returned rule to ``Plugin(rules=[...])`` or :func:`accel.patching.register_rule`. Besides the
    adapter's own ``check``, the rule skips (with the reason) modules with attention dropout, learnable
    bias or ALiBi tensors, dtypes without a kernel, and a missing native extension or device kernel.
    """
    classes = tuple(classes) if isinstance(classes, (tuple, list)) else (classes,)
    if not isinstance(adapter, SigmoidAttentionAdapter):
        raise TypeError("sigmoid_attention_rule: adapter must be a SigmoidAttentionAdapter, got "
                        f"{type(adapter).__name__}")
    label = ", ".join(c.__name__ if isinstance(c, type) else c.rsplit(".", 1)[-1] for c in classes)
    return Rule(
        name=name or f"{label}->SigmoidMultiheadAttention",
        op="sigmoid_attention",
        classes=classes,
        check=lambda m: _attention_check(adapter, m),
        build=lambda m: _attention_build(adapter, m),
        subclasses=subclasses,
        description=description or f"{label} -> accel.nn.AdaptedSigmoidMultiheadAttention (fused sigmoid attention)",
    )


def _reference_options(module: nn.Module) -> Mapping[str, Any]:
    from accel.nn.sigmoid_attention import reference_options

    return reference_options(module)


def _reference_check(module: nn.Module) -> Optional[str]:
    if module.dropout > 0:
        return (f"dropout={module.dropout:g}: the reference module stores it without applying it, and the fused "
                "kernel has no dropout, so which one to match is ambiguous")
    return None


def _call_like_reference(fused: nn.Module, *args, **kwargs):
    from accel.nn.sigmoid_attention import call_like_reference

    return call_like_reference(fused, *args, **kwargs)


REFERENCE_SIGMOID_MHA = sigmoid_attention_rule(
    "accel.reference.sigmoid_attention.SigmoidMultiheadAttention",
    SigmoidAttentionAdapter(options=_reference_options, call=_call_like_reference, check=_reference_check),
    name="reference.SigmoidMultiheadAttention->SigmoidMultiheadAttention",
    description="accel.reference.SigmoidMultiheadAttention -> fused kernel, same call signature and return",
)


def builtin_rules() -> List[Rule]:
    return [CONV1D, REFERENCE_SIGMOID_MHA]
