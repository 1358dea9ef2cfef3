"""Partial convolution (FasterNet's PConv): a 3x3 convolution of the first channels, the rest
passed through, in one output allocation; forward and backward as registered ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from accel import _ext
from accel.ops._capability import Capability, Example
from accel.ops._common import fake_dims, fake_grad, fake_same_device, int_arg, size, tensor_arg

_ext.load()

_NAME = "partial_conv2d"


def _examples(device: torch.device, dtype: torch.dtype):
    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)

    x_cl = torch.randn(2, 16, 6, 9, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    return [
        Example("C13 n_div 4, 7x5, bias", partial_conv2d, (t(2, 13, 7, 5), t(3, 3, 3, 3), t(3)), {}),
        Example("C16 channels_last dim_conv 5, 6x9", partial_conv2d, (x_cl.requires_grad_(), t(5, 5, 3, 3)),
                dict(dim_conv=5)),
        Example("C8 n_div 2, 1x1", partial_conv2d, (t(3, 8, 1, 1), t(4, 4, 3, 3)), dict(n_div=2)),
        Example("every channel convolved, 4x3", partial_conv2d, (t(1, 3, 4, 3), t(3, 3, 3, 3)), dict(dim_conv=3)),
        Example("in place, C13 n_div 4, 7x5, bias", partial_conv2d_,
                (t(2, 13, 7, 5, grad=False), t(3, 3, 3, 3, grad=False), t(3, grad=False)), {}),
        Example("in place, channels_last C16 dim_conv 5", partial_conv2d_,
                (x_cl.detach().clone(), t(5, 5, 3, 3, grad=False)), dict(dim_conv=5)),
    ]


def _sanitize_examples(device: torch.device, dtype: torch.dtype):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    return [Example("C40 n_div 4, 57x31", partial_conv2d, (t(2, 40, 57, 31), t(10, 10, 3, 3)), {})]


CAPABILITY = Capability(
    name="partial_conv2d",
    summary="partial 3x3 convolution (FasterNet PConv): the first channels convolved, the rest copied, one output",
    functions=("partial_conv2d", "partial_conv2d_"),
    ops=("partial_conv2d", "partial_conv2d_backward", "partial_conv2d_"),
    dtypes={"cpu": (torch.float32, torch.float64, torch.bfloat16),
            "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16)},
    examples=_examples,
    modules=("PartialConv2d",),
    bench="pconv",
    doc="docs/ops/partial_conv2d.md",
    limits={"x": "(B, C, H, W), contiguous or channels_last (other strides are read as given)",
            "weight": "(Cp, Cp, 3, 3), Cp = dim_conv or C // n_div, 1 <= Cp <= C; stride 1, padding 1"},
    sanitize_examples=_sanitize_examples,
)


def partial_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dim_conv: Optional[int] = None,
                   n_div: int = 4) -> Tensor:
    """FasterNet's partial convolution: ``cat(conv2d(x[:, :Cp], weight, bias, padding=1), x[:, Cp:])``.

    The output is allocated once, in ``x``'s memory format (contiguous or channels_last): the
    convolved channels are written straight into it and the others copied once, where the split /
    conv / concatenate form moves the tensor about three times.

    Args:
        x: ``(B, C, H, W)``, float32/float64/bfloat16 (and float16 on CUDA).
        weight: ``(Cp, Cp, 3, 3)``, same dtype and device (stride 1, padding 1, as FasterNet).
        bias: optional ``(Cp,)`` (FasterNet has none; a folded BatchNorm gives one).
        dim_conv: Cp, the channels convolved; default ``C // n_div``.
        n_div: ``>= 1``, used when ``dim_conv`` is not given.

    Returns:
        ``(B, C, H, W)`` in ``x``'s dtype (accumulation in fp32 for bf16 and fp16).
    """
    x, weight, cp = _arguments(_NAME, x, weight, dim_conv, n_div)
    return torch.ops.accel.partial_conv2d(x, weight, bias, cp)


def _arguments(op: str, x, weight, dim_conv: Optional[int], n_div: int):
    """The schema's (x, weight, dim_conv): Cp from ``dim_conv``, or ``C // n_div`` without it."""
    x, weight = tensor_arg(op, "x", x), tensor_arg(op, "weight", weight)
    if dim_conv is None:
        n_div = int_arg(op, "n_div", n_div)
        if n_div < 1:
            raise ValueError(f"{op}: n_div must be >= 1, got {n_div}")
        dim_conv = size(x, 1) // n_div
    return x, weight, int_arg(op, "dim_conv", dim_conv)


def partial_conv2d_(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dim_conv: Optional[int] = None,
                    n_div: int = 4) -> Tensor:
    """In place, for inference: ``x[:, :Cp] = conv2d(x[:, :Cp], weight, bias, padding=1)``; returns ``x``.

    The convolved channels go into the tensor the caller owns (through a ``(B, Cp, H, W)`` temporary:
    each output pixel reads its neighbours' old values), the others are not touched. Arguments as
    :func:`partial_conv2d`; not differentiable (use :func:`partial_conv2d` for training).
    """
    x, weight, cp = _arguments(f"{_NAME}_", x, weight, dim_conv, n_div)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError(f"{_NAME}_ is for inference and has no gradient: call it under torch.no_grad(), or use "
                           f"{_NAME} to train")
    torch.ops.accel.partial_conv2d_(x, weight, bias, cp)
    return x


def _like(x: Tensor) -> Tensor:
    """An uninitialised tensor of x's shape in the memory format the kernels give (channels_last
    when x is, contiguous otherwise)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


# ---------------------------------------------------------------- fake (meta) implementations

@torch.library.register_fake("accel::partial_conv2d")
def _partial_conv2d_fake(x, weight, bias, dim_conv):
    fake_dims(_NAME, x=(x, 4, "(B, C, H, W)"), weight=(weight, 4, "(Cp, Cp, 3, 3)"))
    fake_same_device(_NAME, "x", x, weight=weight, bias=bias)
    return _like(x)


@torch.library.register_fake("accel::partial_conv2d_")
def _partial_conv2d_inplace_fake(x, weight, bias, dim_conv):
    fake_dims(_NAME, x=(x, 4, "(B, C, H, W)"), weight=(weight, 4, "(Cp, Cp, 3, 3)"))
    fake_same_device(_NAME, "x", x, weight=weight, bias=bias)


@torch.library.register_fake("accel::partial_conv2d_backward")
def _partial_conv2d_backward_fake(grad_out, x, weight, bias, dim_conv, output_mask):
    grad_b = fake_grad(weight.new_empty((weight.shape[0],)), output_mask[2] and bias is not None)
    grad_x = _like(x) if output_mask[0] else x.new_empty((0,))
    return grad_x, fake_grad(weight.new_empty(weight.shape), output_mask[1]), grad_b


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    x, weight, bias, dim_conv = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.has_bias = bias is not None
    ctx.dim_conv = dim_conv


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(need[2]) and ctx.has_bias]
    if not any(mask):
        return None, None, None, None
    gx, gw, gb = torch.ops.accel.partial_conv2d_backward(grad_out, x, weight, bias, ctx.dim_conv, mask)
    return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None


torch.library.register_autograd("accel::partial_conv2d", _backward, setup_context=_setup_context)
