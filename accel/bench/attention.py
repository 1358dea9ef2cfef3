"""Sigmoid attention benchmark cases (``python -m accel.bench attention``).

Groups:

1. ``vs SDPA``: ``accel.ops.sigmoid_attention`` against ``F.scaled_dot_product_attention`` (softmax:
   the kernel accel's users would otherwise run) and against the eager sigmoid formula
   ``torch.sigmoid(q @ k.transpose(-1, -2) * scale + b) @ v`` as written in plain PyTorch (the
   same maths; it is ``accel.reference.sigmoid_attention``). Forward cases add the same formula
   with in-place element-wise steps (one ``(L, L)`` matrix per head instead of two at a time, no
   extra passes) — a tuned eager baseline, reported alongside for honesty. B 1, H 8, D 64, causal
   and not, forward and forward+backward. On CUDA the SDPA peer is pinned to the flash backend.
   Outputs are checked against the eager formula.
2. ``memory``: one long forward (L 16384 on the full preset) where the eager formula's ``(L, L)``
   logits dominate; the in-place eager formula is the (smaller) yardstick. Read the peak-memory
   columns.
"""
from __future__ import annotations

import contextlib
import math
from typing import List

import torch
import torch.nn.functional as F

import accel.ops as ops
from accel.bench.case import Case, Setup, backward_setup, no_grad_setup

# (B, H, D, lengths) per preset and device
CPU_SHAPES = {"full": (1, 8, (64,), (2048, 8192)), "quick": (1, 8, (64,), (1024,)), "tiny": (1, 2, (32,), (128,))}
GPU_SHAPES = {"full": (2, 16, (64, 128), (1024, 4096, 16384)), "quick": (2, 16, (64, 128), (2048,)),
              "tiny": (1, 2, (64,), (256,))}
MEM_L = {"full": 16384, "quick": 4096, "tiny": 256}
# the eager formula at these lengths takes minutes per call (CPU, forward+backward)
EAGER_MAX_L_BWD_CPU = 8192


def _tol(dtype: str) -> float:
    return 3e-2 if dtype in ("bfloat16", "float16") else 1e-4


def _sdpa_context(device: str):
    if device.startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def eager_sigmoid(q, k, v, scale: float, bias: float, causal: bool):
    """The eager formula as written in plain PyTorch."""
    p = torch.sigmoid(torch.matmul(q, k.transpose(-1, -2)) * scale + bias)
    if causal:
        lq, lk = p.shape[-2:]
        p = p.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=p.device).triu(lk - lq + 1), 0)
    return torch.matmul(p, v)


def eager_sigmoid_inplace(q, k, v, scale: float, bias: float, causal: bool):
    """The eager formula with in-place element-wise steps: one (L, L) matrix per head (no autograd)."""
    s = torch.matmul(q, k.transpose(-1, -2))
    s.mul_(scale).add_(bias).sigmoid_()
    if causal:
        lq, lk = s.shape[-2:]
        s.masked_fill_(torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(lk - lq + 1), 0)
    return torch.matmul(s, v)


def build_attention(*, B: int, H: int, L: int, D: int, causal: bool, mode: str, device: str, dtype: str,
                    eager: bool = True, eager_inplace: bool = False, seed: int = 0) -> Setup:
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dt) for _ in range(3))
    scale, bias = 1.0 / math.sqrt(D), -math.log(L)

    def accel_fn():
        return ops.sigmoid_attention(q, k, v, causal=causal)

    def sdpa_fn():
        with _sdpa_context(device):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def eager_fn():
        return eager_sigmoid(q, k, v, scale, bias, causal)

    fns = {"accel": accel_fn, "SDPA (softmax)": sdpa_fn}
    if eager:
        fns["eager sigmoid"] = eager_fn
    if eager_inplace and mode == "fwd":
        fns["eager sigmoid (in-place)"] = lambda: eager_sigmoid_inplace(q, k, v, scale, bias, causal)
    if mode == "fwd":
        return no_grad_setup(fns)

    gy = torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dt)
    return backward_setup(fns, (q, k, v), gy)


def cases(args) -> List[Case]:
    size, device, dtype = args.size, args.device, args.dtype
    cuda = device.startswith("cuda")
    B, H, Ds, Ls = (GPU_SHAPES if cuda else CPU_SHAPES)[size]
    out: List[Case] = []
    group = f"sigmoid attention vs SDPA, {device} {dtype}, B{B} H{H}"
    for mode in ("fwd", "fwd+bwd"):
        for D in Ds:
            for L in Ls:
                for causal in (False, True):
                    eager = cuda or mode == "fwd" or L <= EAGER_MAX_L_BWD_CPU
                    # the eager formula's (L, L) fp32 matrices (two at a time, more saved for backward) must fit
                    eager = eager and B * H * L * L * 4 * (3 if mode != "fwd" else 2) <= 12 * 1024 ** 3
                    inplace = eager and mode == "fwd"
                    params = dict(B=B, H=H, L=L, D=D, causal=causal, mode=mode, device=device, dtype=dtype,
                                  eager=eager, eager_inplace=inplace)
                    peers = (("SDPA (softmax)",) + (("eager sigmoid",) if eager else ())
                             + (("eager sigmoid (in-place)",) if inplace else ()))
                    out.append(Case(
                        op="attention", group=group, name=f"L{L} D{D}" + (" causal" if causal else ""), mode=mode,
                        builder=build_attention, params=params, peers=peers,
                        check=("eager sigmoid",) if eager else (), tol=_tol(dtype),
                        warm_params=dict(params, L=min(L, 256)),
                        note="SDPA computes softmax attention (a different function, the speed yardstick); "
                             "the eager sigmoid formula computes the same function and is the correctness check"
                             + ("; SDPA pinned to the flash backend" if cuda else ""),
                    ))
    L = MEM_L[size]
    D = Ds[0]
    params = dict(B=1, H=8 if size != "tiny" else 2, L=L, D=D, causal=False, mode="fwd", device=device, dtype=dtype,
                  eager=False, eager_inplace=True)
    out.append(Case(
        op="attention", group=f"sigmoid attention memory, {device} {dtype}", name=f"B1 H{params['H']} L{L} D{D}",
        mode="fwd", builder=build_attention, params=params, peers=("SDPA (softmax)", "eager sigmoid (in-place)"),
        check=("eager sigmoid (in-place)",), tol=_tol(dtype), warm_params=dict(params, L=256),
        note="read the peak-memory columns: the eager formula holds the (L, L) logits of every head "
             "(the in-place variant, one matrix at a time: the smallest eager footprint)",
    ))
    return out
