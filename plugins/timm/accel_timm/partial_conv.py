"""timm FasterNet's partial convolution through accel: ``PARTIAL_CONV_RULE``.

``accel.patch`` replaces each ``timm.models.fasternet.Partial_conv3`` by
``accel.nn.PartialConv2d.from_module(module)``: a 3x3 convolution of the first ``dim_conv3`` channels, the
others copied, in one call of ``accel.ops.partial_conv2d``, sharing the module's ``partial_conv3``
``nn.Conv2d`` (same parameters, same state_dict keys). timm binds ``forward`` on each instance
(``forward_slicing`` or ``forward_split_cat``), so the module is replaced rather than a method patched.

Left alone, with the reason in the report: a ``partial_conv3`` that is not a plain 3x3 / stride 1 /
padding 1 ``nn.Conv2d`` (a subclass, hooks on it, another geometry), an instance whose ``forward`` is not
one of timm's two, and a device or dtype without a kernel.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from accel.patching import Rule
from accel.patching.builtin import op_reason

# By dotted path: importing the plugin must not import timm.
PARTIAL_CONV3 = "timm.models.fasternet.Partial_conv3"
_FORWARDS = ("forward_slicing", "forward_split_cat")
_FROM_MODULE = "PartialConv2d.from_module: "


def _forward_reason(module: nn.Module) -> Optional[str]:
    """None when ``module.forward`` is timm's own bound ``forward_slicing`` / ``forward_split_cat``."""
    forward = module.__dict__.get("forward")
    for name in _FORWARDS:
        if getattr(forward, "__self__", None) is module and \
                getattr(forward, "__func__", None) is getattr(type(module), name, None):
            return None
    return "its forward is not timm's forward_slicing / forward_split_cat: PartialConv2d would not run it"


def _check(module: nn.Module) -> Optional[str]:
    conv = getattr(module, "partial_conv3", None)
    if type(conv) is not nn.Conv2d:  # a subclass may change forward (e.g. weight standardisation)
        return f"its partial_conv3 is {type(conv).__name__}, not an nn.Conv2d"
    if conv._forward_hooks or conv._forward_pre_hooks:
        return "its partial_conv3 has forward hooks, which PartialConv2d would bypass"
    reason = _forward_reason(module)
    if reason is not None:
        return reason
    weight, bias = conv.weight, conv.bias
    if bias is not None and bias.dtype != weight.dtype:
        return f"partial_conv3's bias dtype {bias.dtype} differs from its weight dtype {weight.dtype}"
    reason = op_reason("partial_conv2d", weight.device, weight.dtype)  # first: accel.nn needs the native op
    if reason is not None:
        return reason
    from accel.nn.partial_conv import PartialConv2d

    try:
        PartialConv2d.from_module(module)
    except (TypeError, ValueError) as e:
        message = str(e)
        return message[len(_FROM_MODULE):] if message.startswith(_FROM_MODULE) else message
    return None


def _build(module: nn.Module) -> nn.Module:
    from accel.nn.partial_conv import PartialConv2d  # lazy: accel.nn needs the native extension

    return PartialConv2d.from_module(module).train(module.training)


PARTIAL_CONV_RULE = Rule(
    name="timm: Partial_conv3 -> PartialConv2d",
    op="partial_conv2d",
    classes=(PARTIAL_CONV3,),
    check=_check,
    build=_build,
    description="timm FasterNet's Partial_conv3 (3x3 conv of the first dim // n_div channels, the rest passed "
                "through) -> accel.nn.PartialConv2d (accel.ops.partial_conv2d), its conv shared",
)
