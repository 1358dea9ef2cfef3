"""BatchNorm folding for inference: ``accel.patch(model, fuse_bn=True)``.

A BatchNorm in eval mode is an affine map per channel, so one that directly follows a convolution
(consecutive children of an ``nn.Sequential``: the convolution's output reaches nothing else) folds
into that convolution's weight and bias, and the BatchNorm becomes ``nn.Identity``: one pass over
the activations fewer per pair. Both swaps are recorded like any replacement, so ``accel.unpatch``
brings the original modules back.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Pair = Tuple[str, nn.Sequential, str, str]  # (path of the Sequential, it, conv's name, norm's name)


def pairs(root: nn.Module) -> Iterator[Pair]:
    """Every (convolution or module, BatchNorm) pair of consecutive children of an nn.Sequential."""
    for path, seq in root.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = [n for n, m in seq._modules.items() if m is not None]
        for a, b in zip(names, names[1:]):
            if isinstance(seq._modules[b], NORMS):
                yield path, seq, a, b


def reason(conv: nn.Module, norm: nn.Module, shared: bool) -> Optional[str]:
    """Why the pair cannot be folded, or None."""
    if not isinstance(conv, CONVS):
        return f"follows a {type(conv).__name__}, not a convolution: not folded"
    if norm.training:
        return "in training mode: folding needs the running statistics (call model.eval())"
    if norm.running_mean is None or norm.running_var is None:
        return "keeps no running statistics (track_running_stats=False)"
    if norm.num_features != conv.out_channels:
        return f"has {norm.num_features} features but the convolution {conv.out_channels} output channels"
    if shared:
        return "its convolution is also used elsewhere in the model"
    for m in (conv, norm):
        if any(getattr(m, h, None) for h in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                                              "_backward_pre_hooks")):
            return f"{type(m).__name__} has hooks; a folded module would drop them"
    if conv.weight.dtype != norm.running_var.dtype or conv.weight.device != norm.running_var.device:
        return "the convolution and the BatchNorm differ in dtype or device"
    return None


# A new convolution equal to norm(conv(x)) in eval mode (torch's own folding formula).
fold = fuse_conv_bn_eval


def plan(root: nn.Module, shared_ids: set) -> Tuple[List[Pair], List[Tuple[str, str]]]:
    """The pairs to fold, and (path of the BatchNorm, reason) for those that are not."""
    todo, skipped = [], []
    for path, seq, a, b in pairs(root):
        conv, norm = seq._modules[a], seq._modules[b]
        why = reason(conv, norm, id(conv) in shared_ids or id(norm) in shared_ids)
        full = f"{path}.{b}" if path else b
        if why is None:
            todo.append((path, seq, a, b))
        else:
            skipped.append((full, why))
    return todo, skipped
