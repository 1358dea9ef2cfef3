"""Dilated 1-D convolution (the TCN building block), forward and backward as registered ops."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from accel import _ext
from accel.ops._capability import Capability, Example
from accel.ops._common import fake_dims, fake_grad, grads_for, int_arg, size, tensor_arg

_ext.load()

_NAME = "dilated_conv1d"


def _examples(device: torch.device, dtype: torch.dtype):
    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    return [
        Example("depthwise causal K5 d3 gelu residual", dilated_conv1d, (t(2, 7, 29), t(7, 1, 5), t(7)),
                dict(dilation=3, groups=7, activation="gelu", residual=t(2, 7, 29))),
        Example("grouped same K4 d2 silu", dilated_conv1d, (t(1, 6, 17), t(4, 3, 4), t(4)),
                dict(dilation=2, padding="same", groups=2, activation="silu")),
        Example("dense padding 3 relu, no bias", dilated_conv1d, (t(2, 3, 11), t(5, 3, 3)),
                dict(padding=3, activation="relu")),
    ]


def _sanitize_examples(device: torch.device, dtype: torch.dtype):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    x = t(2, 37, 257)
    return [Example("depthwise C37 L257 K5 d3", dilated_conv1d, (x, t(37, 1, 5), None), dict(dilation=3, groups=37)),
            Example("dense C37->12 L257 same", dilated_conv1d, (x, t(12, 37, 3), None),
                    dict(dilation=2, padding="same"))]


_ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

CAPABILITY = Capability(
    name="dilated_conv1d",
    summary="dilated 1-D convolution (causal/same/int padding, grouped, fused bias, activation, residual)",
    functions=("dilated_conv1d",),
    ops=("dilated_conv1d", "dilated_conv1d_backward"),
    dtypes={"cpu": _ALL_FLOATS, "cuda": _ALL_FLOATS},
    examples=_examples,
    modules=("DilatedConv1d", "TCN"),
    bench="conv",
    doc="docs/ops/dilated_conv1d.md",
    limits={"kernel size": "any K >= 1", "dilation": ">= 1",
            "groups": "divides C_in and C_out (depthwise: groups = C_in)",
            "CUDA length": "L, L_out and (K-1)*dilation below 2^29"},
    sanitize_examples=_sanitize_examples,
)

Padding = Union[str, int]


def resolve_padding(padding: Padding, kernel_size: int, dilation: int, length: int) -> Tuple[int, int]:
    """Return ``(pad_left, out_length)`` for a padding spec.

    ``"causal"`` pads ``(K-1)*dilation`` on the left (output ``t`` sees inputs ``<= t``);
    ``"same"`` pads ``(K-1)*dilation`` in total, the extra element on the right as
    ``nn.Conv1d(padding="same")`` does; an int pads that many zeros on both sides.
    """
    span = (kernel_size - 1) * dilation
    if padding == "causal":
        return span, length
    if padding == "same":
        return span // 2, length
    if isinstance(padding, bool) or not isinstance(padding, int):
        raise ValueError(f"dilated_conv1d: padding must be 'causal', 'same' or an int, got {padding!r}")
    if padding < 0:
        raise ValueError(f"dilated_conv1d: integer padding must be >= 0, got {padding}")
    out_length = length + 2 * padding - span
    if out_length <= 0:
        raise ValueError(
            f"dilated_conv1d: padding={padding} leaves no output: L={length} + 2*{padding} is shorter than the "
            f"receptive field (K-1)*dilation+1 = {span + 1} (K={kernel_size}, dilation={dilation})"
        )
    return padding, out_length


def dilated_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    dilation: int = 1,
    padding: Padding = "causal",
    groups: int = 1,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Dilated 1-D convolution with fused bias, activation and residual add.

    ``out[b, o, t] = act(bias[o] + sum_{i, k} weight[o, i, k] * x[b, g(o)*C_in/groups + i, t + k*dilation - pad_left]) + residual[b, o, t]``

    Args:
        x: ``(B, C_in, L)``, float32/float64/bfloat16 (float16 on CUDA too).
        weight: ``(C_out, C_in / groups, K)``, same dtype and device; any ``K >= 1``.
        bias: optional ``(C_out,)``.
        dilation: ``>= 1``.
        padding: ``"causal"`` (left ``(K-1)*dilation``; output length ``L``), ``"same"``
            (output length ``L``) or an int ``p`` (both sides; output length ``L + 2p - (K-1)*dilation``).
        groups: divides ``C_in`` and ``C_out``; ``groups == C_in`` is the depthwise fast path.
        activation: ``None``, ``"relu"``, ``"gelu"`` (exact erf form) or ``"silu"``, applied after the bias.
        residual: optional ``(B, C_out, L_out)`` tensor added after the activation.

    Returns:
        ``(B, C_out, L_out)`` in ``x``'s dtype (accumulation is fp32 for low precision).
    """
    x, weight = tensor_arg(_NAME, "x", x), tensor_arg(_NAME, "weight", weight)
    dilation, groups = int_arg(_NAME, "dilation", dilation), int_arg(_NAME, "groups", groups)
    act = "none" if activation is None else activation
    pad_left, out_length = resolve_padding(padding, size(weight, -1, 1), dilation, size(x, -1))
    return torch.ops.accel.dilated_conv1d(x, weight, bias, residual, dilation, pad_left, out_length, groups, act)


# ---------------------------------------------------------------- fake (meta) implementations

@torch.library.register_fake("accel::dilated_conv1d")
def _dilated_conv1d_fake(x, weight, bias, residual, dilation, pad_left, out_length, groups, activation):
    fake_dims(_NAME, x=(x, 3, "(B, C_in, L)"), weight=(weight, 3, "(C_out, C_in / groups, K)"))
    return x.new_empty((x.shape[0], weight.shape[0], out_length))


@torch.library.register_fake("accel::dilated_conv1d_backward")
def _dilated_conv1d_backward_fake(grad_out, x, weight, bias, dilation, pad_left, groups, activation, output_mask):
    # gradients are contiguous whatever the inputs' strides (both backends allocate them so)
    grad_b = fake_grad(x.new_empty((weight.shape[0],)), output_mask[2] and bias is not None)
    return fake_grad(x, output_mask[0]), fake_grad(weight, output_mask[1]), grad_b


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, dilation, pad_left, out_length, groups, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.args = (dilation, pad_left, groups, activation)


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    dilation, pad_left, groups, activation = ctx.args
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(need[2]) and ctx.has_bias]
    grad_x = grad_w = grad_b = grad_res = None
    if any(mask):
        gx, gw, gb = torch.ops.accel.dilated_conv1d_backward(
            grad_out.contiguous(), x, weight, bias, dilation, pad_left, groups, activation, mask
        )
        grad_x = gx if mask[0] else None
        grad_w = gw if mask[1] else None
        grad_b = gb if mask[2] else None
    if ctx.has_residual and need[3]:
        grad_res = grad_out
    return grad_x, grad_w, grad_b, grad_res, None, None, None, None, None


torch.library.register_autograd("accel::dilated_conv1d", _backward, setup_context=_setup_context)
