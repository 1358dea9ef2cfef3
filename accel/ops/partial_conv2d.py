"""Partial convolution (FasterNet's PConv): a 3x3 convolution of the first channels, the rest
passed through (or scaled and shifted per plane: PATNet's PAT_ch gate), in one output allocation;
and the per-channel statistics PAT_ch gates with. Forward and backward as registered ops."""
from __future__ import annotations

from typing import Optional, Tuple

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
        Example("C13 n_div 4, 7x5, scale and shift", partial_conv2d, (t(2, 13, 7, 5), t(3, 3, 3, 3)),
                dict(scale=t(2, 10), shift=t(2, 10))),
        Example("channels_last C16 dim_conv 5, scale", partial_conv2d,
                (x_cl.detach().clone().requires_grad_(), t(5, 5, 3, 3), t(5)), dict(dim_conv=5, scale=t(2, 11))),
        Example("in place, C13 n_div 4, scale and shift", partial_conv2d_,
                (t(2, 13, 7, 5, grad=False), t(3, 3, 3, 3, grad=False)),
                dict(scale=t(2, 10, grad=False), shift=t(2, 10, grad=False))),
        Example("stats, C13 n_div 4, 7x5", partial_conv2d_stats, (t(2, 13, 7, 5),), {}),
        Example("stats, channels_last C16 dim_conv 5", partial_conv2d_stats,
                (x_cl.detach().clone().requires_grad_(),), dict(dim_conv=5)),
        Example("stats, 1x2 image, every channel", partial_conv2d_stats, (t(3, 4, 1, 2),), dict(dim_conv=0)),
    ]


def _sanitize_examples(device: torch.device, dtype: torch.dtype):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    return [Example("C40 n_div 4, 57x31", partial_conv2d, (t(2, 40, 57, 31), t(10, 10, 3, 3)), {}),
            Example("C40 n_div 4, 57x31, scale and shift", partial_conv2d, (t(2, 40, 57, 31), t(10, 10, 3, 3)),
                    dict(scale=t(2, 30), shift=t(2, 30))),
            Example("stats, C40 n_div 4, 57x31", partial_conv2d_stats, (t(2, 40, 57, 31),), {})]


CAPABILITY = Capability(
    name="partial_conv2d",
    summary="partial 3x3 convolution (FasterNet PConv, PATNet PAT_ch): the first channels convolved, the rest "
            "copied or scaled per plane, one output",
    functions=("partial_conv2d", "partial_conv2d_", "partial_conv2d_stats"),
    ops=("partial_conv2d", "partial_conv2d_backward", "partial_conv2d_", "partial_conv2d_stats",
         "partial_conv2d_stats_backward"),
    dtypes={"cpu": (torch.float32, torch.float64, torch.bfloat16),
            "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16)},
    examples=_examples,
    modules=("PartialConv2d", "PATChannel"),
    bench="pconv",
    doc="docs/ops/partial_conv2d.md",
    limits={"x": "(B, C, H, W), contiguous or channels_last (other strides are read as given)",
            "weight": "(Cp, Cp, 3, 3), Cp = dim_conv or C // n_div, 1 <= Cp <= C; stride 1, padding 1",
            "scale, shift": "(B, C - Cp), x's dtype (per-plane affine of the untouched channels)"},
    sanitize_examples=_sanitize_examples,
)


def partial_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dim_conv: Optional[int] = None,
                   n_div: int = 4, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """FasterNet's partial convolution: ``cat(conv2d(x[:, :Cp], weight, bias, padding=1), x[:, Cp:])``,
    or with ``scale``/``shift`` ``cat(conv2d(...), x[:, Cp:] * scale[..., None, None] + shift[..., None, None])``.

    The output is allocated once, in ``x``'s memory format (contiguous or channels_last): the
    convolved channels are written straight into it and the others copied once, where the split /
    conv / concatenate form moves the tensor about three times.

    Args:
        x: ``(B, C, H, W)``, float32/float64/bfloat16 (and float16 on CUDA).
        weight: ``(Cp, Cp, 3, 3)``, same dtype and device (stride 1, padding 1, as FasterNet).
        bias: optional ``(Cp,)`` (FasterNet has none; a folded BatchNorm gives one).
        dim_conv: Cp, the channels convolved; default ``C // n_div``.
        n_div: ``>= 1``, used when ``dim_conv`` is not given.
        scale, shift: optional ``(B, C - Cp)`` in x's dtype: each untouched plane scaled and shifted
            in the same pass (PAT_ch's gate and BatchNorm); differentiable.

    Returns:
        ``(B, C, H, W)`` in ``x``'s dtype (accumulation in fp32 for bf16 and fp16).
    """
    x, weight, cp = _arguments(_NAME, x, weight, dim_conv, n_div)
    return torch.ops.accel.partial_conv2d(x, weight, bias, cp, scale, shift)


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
                    n_div: int = 4, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """In place, for inference: ``x[:, :Cp] = conv2d(x[:, :Cp], weight, bias, padding=1)``; returns ``x``.

    The convolved channels go into the tensor the caller owns (through a ``(B, Cp, H, W)`` temporary:
    each output pixel reads its neighbours' old values), the others are not touched (or scaled and
    shifted in place). Arguments as :func:`partial_conv2d`; not differentiable (use
    :func:`partial_conv2d` for training).
    """
    x, weight, cp = _arguments(f"{_NAME}_", x, weight, dim_conv, n_div)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, scale, shift)):
        raise RuntimeError(f"{_NAME}_ is for inference and has no gradient: call it under torch.no_grad(), or use "
                           f"{_NAME} to train")
    torch.ops.accel.partial_conv2d_(x, weight, bias, cp, scale, shift)
    return x


def partial_conv2d_stats(x: Tensor, *, dim_conv: Optional[int] = None, n_div: int = 4) -> Tuple[Tensor, Tensor]:
    """PAT_ch's statistics of the untouched channels: ``(mean, std)`` of ``x[:, Cp:]`` over H x W.

    One pass over those channels, accumulating in fp32 (fp64 for fp64); ``std`` is unbiased, as
    ``torch.std`` (NaN for a 1 x 1 image). Differentiable.

    Args:
        x: ``(B, C, H, W)``, any strides.
        dim_conv: Cp, the channels skipped (``0 <= Cp <= C``); default ``C // n_div``.

    Returns:
        ``mean``, ``std``: ``(B, C - Cp)`` each, in x's dtype.
    """
    op = f"{_NAME}_stats"
    x = tensor_arg(op, "x", x)
    if dim_conv is None:
        n_div = int_arg(op, "n_div", n_div)
        if n_div < 1:
            raise ValueError(f"{op}: n_div must be >= 1, got {n_div}")
        dim_conv = size(x, 1) // n_div
    return torch.ops.accel.partial_conv2d_stats(x, int_arg(op, "dim_conv", dim_conv))


def _like(x: Tensor) -> Tensor:
    """An uninitialised tensor of x's shape in the memory format the kernels give (channels_last
    when x is, contiguous otherwise)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


# ---------------------------------------------------------------- fake (meta) implementations

@torch.library.register_fake("accel::partial_conv2d")
def _partial_conv2d_fake(x, weight, bias, dim_conv, scale=None, shift=None):
    fake_dims(_NAME, x=(x, 4, "(B, C, H, W)"), weight=(weight, 4, "(Cp, Cp, 3, 3)"))
    fake_same_device(_NAME, "x", x, weight=weight, bias=bias, scale=scale, shift=shift)
    return _like(x)


@torch.library.register_fake("accel::partial_conv2d_")
def _partial_conv2d_inplace_fake(x, weight, bias, dim_conv, scale=None, shift=None):
    fake_dims(_NAME, x=(x, 4, "(B, C, H, W)"), weight=(weight, 4, "(Cp, Cp, 3, 3)"))
    fake_same_device(_NAME, "x", x, weight=weight, bias=bias, scale=scale, shift=shift)


@torch.library.register_fake("accel::partial_conv2d_backward")
def _partial_conv2d_backward_fake(grad_out, x, weight, bias, dim_conv, scale, shift, output_mask):
    grad_b = fake_grad(weight.new_empty((weight.shape[0],)), output_mask[2] and bias is not None)
    grad_x = _like(x) if output_mask[0] else x.new_empty((0,))
    grad_scale = fake_grad(scale.new_empty(scale.shape), output_mask[3]) if scale is not None else x.new_empty((0,))
    grad_shift = fake_grad(shift.new_empty(shift.shape), output_mask[4]) if shift is not None else x.new_empty((0,))
    return grad_x, fake_grad(weight.new_empty(weight.shape), output_mask[1]), grad_b, grad_scale, grad_shift


@torch.library.register_fake("accel::partial_conv2d_stats")
def _partial_conv2d_stats_fake(x, dim_conv):
    fake_dims(f"{_NAME}_stats", x=(x, 4, "(B, C, H, W)"))
    shape = (x.shape[0], x.shape[1] - dim_conv)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.register_fake("accel::partial_conv2d_stats_backward")
def _partial_conv2d_stats_backward_fake(grad_mean, grad_std, x, mean, std, dim_conv):
    return _like(x)


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    x, weight, bias, dim_conv, scale, shift = tuple(inputs) + (None,) * (6 - len(inputs))
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.given = (bias is not None, scale is not None, shift is not None)
    ctx.dim_conv = dim_conv


def _backward(ctx, grad_out):
    x, weight, bias, scale, shift = ctx.saved_tensors
    # trailing arguments left at their default (scale, shift None) may have no entry
    n = len(ctx.needs_input_grad)
    need = tuple(ctx.needs_input_grad) + (False,) * (6 - n)
    has_bias, has_scale, has_shift = ctx.given
    mask = [bool(need[0]), bool(need[1]), bool(need[2]) and has_bias, bool(need[4]) and has_scale,
            bool(need[5]) and has_shift]
    grads = [None] * 6
    if any(mask):
        out = torch.ops.accel.partial_conv2d_backward(grad_out, x, weight, bias, ctx.dim_conv, scale, shift, mask)
        for i, g, m in zip((0, 1, 2, 4, 5), out, mask):
            grads[i] = g if m else None
    return tuple(grads[:n])


torch.library.register_autograd("accel::partial_conv2d", _backward, setup_context=_setup_context)


def _stats_setup_context(ctx, inputs, output):
    x, dim_conv = inputs
    ctx.save_for_backward(x, *output)
    ctx.dim_conv = dim_conv


def _stats_backward(ctx, grad_mean, grad_std):
    x, mean, std = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    grad_std = torch.zeros_like(std) if grad_std is None else grad_std
    return torch.ops.accel.partial_conv2d_stats_backward(grad_mean, grad_std, x, mean, std, ctx.dim_conv), None


torch.library.register_autograd("accel::partial_conv2d_stats", _stats_backward, setup_context=_stats_setup_context)
