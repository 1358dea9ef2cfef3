"""Partial convolution benchmark cases (``python -m accel.bench pconv``).

Groups:

1. ``PConv``: ``accel.nn.PartialConv2d`` against timm's ``Partial_conv3`` in its training form
   (``split_cat``: split, ``nn.Conv2d`` on the first C/4 channels, concatenate; without timm the
   same three calls written out), FasterNet's four stage shapes (C 40/80/160/320 at 56/28/14/7,
   n_div 4), batch 32 and 1, forward and forward+backward (gradients of x and the weight). Forward
   cases also time ``out.copy_(x)`` in the same rounds: accel's bandwidth (x read + output written,
   once each) as a fraction of the copy's.
2. ``PAT_ch``: ``accel.nn.PATChannel`` against PATNet's eager formula
   (``accel.reference.partial_conv2d.PATChannelFormula``: split, conv, mean/std, gate, BatchNorm,
   concatenate), the stage shapes, eval-mode forward and train-mode forward+backward (batch >= 2).
3. ``FasterNet``: whole ``fasternet_t0`` / ``fasternet_t1`` (timm, random weights, eval mode,
   224x224) with ``accel.patch`` against unpatched, forward, batch 1 and 32, and again with
   ``fuse_bn=True`` (only with timm).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from accel.bench.case import Case, Setup, backward_setup, element_size, no_grad_setup, tolerance
from accel.nn import PartialConv2d, PATChannel
from accel.reference.partial_conv2d import PATChannelFormula

# (C, H = W) of FasterNet's stages; batches per preset
STAGES = {"full": ((40, 56), (80, 28), (160, 14), (320, 7)), "quick": ((40, 56), (160, 14)), "tiny": ((8, 9),)}
BATCHES = {"full": (32, 1), "quick": (8,), "tiny": (2,)}
MODELS = {"full": (("fasternet_t0", 32), ("fasternet_t0", 1), ("fasternet_t1", 32), ("fasternet_t1", 1)),
          "quick": (("fasternet_t0", 4),), "tiny": (("fasternet_t0", 1),)}
N_DIV = 4


def _timm():
    try:
        import timm.models.fasternet as fasternet
    except ImportError:
        return None
    return fasternet


def _peer_name() -> str:
    return "timm Partial_conv3 split_cat" if _timm() is not None else "split+conv2d+cat"


class _SplitCat(nn.Module):
    """timm's Partial_conv3 forward_split_cat, for machines without timm."""

    def __init__(self, dim: int, n_div: int):
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)

    def forward(self, x):
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


def build_pconv(*, B: int, C: int, HW: int, mode: str, device: str, dtype: str, seed: int = 0) -> Setup:
    """accel PartialConv2d vs timm's Partial_conv3 (split_cat), same weights."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    fasternet = _timm()
    peer = fasternet.Partial_conv3(C, N_DIV, "split_cat") if fasternet is not None else _SplitCat(C, N_DIV)
    with torch.no_grad():
        w = peer.partial_conv3.weight
        w.copy_(torch.randn(w.shape, generator=g) / (w[0].numel() ** 0.5))
    peer = peer.to(device=device, dtype=dt)
    mine = PartialConv2d.from_module(peer)
    x = torch.randn(B, C, HW, HW, generator=g).to(device=device, dtype=dt)
    impls = {"accel": lambda: mine(x), _peer_name(): lambda: peer(x)}
    if mode == "fwd":
        out = torch.empty_like(x)
        impls["copy_"] = lambda: out.copy_(x)
        return no_grad_setup(impls)
    gy = torch.randn(x.shape, generator=g).to(device=device, dtype=dt)
    return backward_setup(impls, (x, peer.partial_conv3.weight), gy)


def build_pat_channel(*, B: int, C: int, HW: int, mode: str, device: str, dtype: str, seed: int = 0) -> Setup:
    """accel PATChannel vs PATNet's eager PAT_ch formula, same weights and running statistics."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    peer = PATChannelFormula(C, N_DIV)
    with torch.no_grad():  # weights ~ N(0, 1/fan_in), BatchNorms near identity: a trained net's scales
        for conv in (peer.partial_conv3, peer.attn.cfc1):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight[0].numel() ** 0.5)
        for bn in (peer.attn.bn, peer.norm):
            for t, base, spread in ((bn.weight, 1.0, 0.1), (bn.bias, 0.0, 0.1), (bn.running_mean, 0.0, 0.1)):
                t.copy_(base + spread * torch.randn(t.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    peer = peer.to(device=device, dtype=dt).train(mode != "fwd")
    mine = PATChannel.from_module(peer)
    x = torch.randn(B, C, HW, HW, generator=g).to(device=device, dtype=dt)
    impls = {"accel": lambda: mine(x), "eager formula": lambda: peer(x)}
    if mode == "fwd":
        return no_grad_setup(impls)
    gy = torch.randn(x.shape, generator=g).to(device=device, dtype=dt)
    return backward_setup(impls, (x, peer.partial_conv3.weight, peer.attn.cfc1.weight), gy)


def build_model(*, name: str, B: int, device: str, dtype: str, fuse_bn: bool = False, seed: int = 0) -> Setup:
    """A timm FasterNet patched by accel.patch (optionally with fuse_bn) vs the same model unpatched."""
    import timm

    import accel

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).to(device=device, dtype=getattr(torch, dtype)).eval()
    patched = accel.patch(model, inplace=False, fuse_bn=fuse_bn).model
    x = torch.randn(B, 3, 224, 224, device=device, dtype=getattr(torch, dtype))
    return no_grad_setup({"accel": lambda: patched(x), "timm": lambda: model(x)})


def cases(args) -> List[Case]:
    size, device, dtype = args.size, args.device, args.dtype
    out: List[Case] = []
    peer = _peer_name()
    for mode in ("fwd", "fwd+bwd"):
        for B in BATCHES[size]:
            for C, HW in STAGES[size]:
                params = dict(B=B, C=C, HW=HW, mode=mode, device=device, dtype=dtype)
                nbytes = B * C * HW * HW * element_size(dtype)
                bw = mode == "fwd"
                out.append(Case(
                    op="pconv", group=f"PConv (FasterNet stages, n_div {N_DIV}), {device} {dtype}",
                    name=f"B{B} C{C} {HW}x{HW}", mode=mode, builder=build_pconv, params=params, peers=(peer,),
                    aux=("copy_",) if bw else (), check=(peer,), tol=tolerance(dtype, mode),
                    bw_bytes=2 * nbytes if bw else None, bw_ref="copy_" if bw else None,
                    bw_ref_bytes=2 * nbytes if bw else None, warm_params=dict(params, B=1, C=8, HW=8),
                    note=("accel GB/s = (x read + output written, once each) / median time; % is of out.copy_(x)'s "
                          "bandwidth (fastest round) in the same rounds"),
                ))
    for mode in ("fwd", "fwd+bwd"):
        for B in BATCHES[size]:
            if mode == "fwd+bwd" and B < 2:  # train mode: the gate's BatchNorm needs two images
                continue
            for C, HW in STAGES[size]:
                params = dict(B=B, C=C, HW=HW, mode=mode, device=device, dtype=dtype)
                out.append(Case(
                    op="pconv", group=f"PAT_ch (PATNet, n_div {N_DIV}, {'eval' if mode == 'fwd' else 'train'}), "
                                      f"{device} {dtype}",
                    name=f"B{B} C{C} {HW}x{HW}", mode=mode, builder=build_pat_channel, params=params,
                    peers=("eager formula",), check=("eager formula",), tol=tolerance(dtype, mode),
                    warm_params=dict(params, B=2, C=8, HW=8),
                    note=("accel.nn.PATChannel against PATNet's eager PAT_ch (split, conv, mean/std gate, BatchNorm, "
                          "cat)"),
                ))
    if _timm() is not None:
        for fuse_bn in (False, True):
            for name, B in MODELS[size]:
                params = dict(name=name, B=B, device=device, dtype=dtype, fuse_bn=fuse_bn)
                out.append(Case(
                    op="pconv", group=f"FasterNet (timm, eval, 224x224{', fuse_bn' if fuse_bn else ''}), {device} {dtype}",
                    name=f"{name} B{B}", mode="fwd", builder=build_model, params=params, peers=("timm",),
                    check=("timm",), tol=tolerance(dtype, "fwd"), warm_params=dict(params, name="fasternet_t0", B=1),
                    note=("accel.patch(model" + (", fuse_bn=True" if fuse_bn else "") + ") (every spatial_mixing a "
                          "PartialConv2d" + (", the MLPs' BatchNorms folded" if fuse_bn else "") + ") against the "
                          "unpatched model"),
                ))
    return out
