"""Dilated conv1d and TCN benchmark cases (``python -m accel.bench conv``).

Groups:

1. ``depthwise causal conv``: ``accel.ops.dilated_conv1d(padding="causal", groups=C)`` against
   ``nn.Conv1d(C, C, K, groups=C, dilation=d, padding=(K-1)*d)`` sliced to ``[..., :L]`` (the usual
   causal trick), same weights, forward and forward+backward (gradients of x, weight and bias from a
   fixed ``grad_output``). Forward cases also time ``out.copy_(x)`` of the same bytes in the same
   rounds; accel's bandwidth (x read + y written, divided by its time) is reported as a fraction of
   that copy bandwidth.
2. ``issue grid``: C in {256, 1024} x L in {16k, 128k} x K in {3, 7} x d in {1, 64}, depthwise,
   plus one dense (groups=1) case, which is compute-bound and where accel may well lose.
3. ``TCN vs FFT long conv``: ``accel.nn.TCN(C, 3, receptive_field=L, activation="gelu")`` against a
   causal FFT convolution with an L-long per-channel kernel, ``irfft(rfft(x, 2L) * rfft(k, 2L))[:L]
   + D * x`` (S4/MEGA style), TCNCA's comparison.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

import accel.ops as ops
from accel.bench.case import Case, Setup, backward_setup, element_size, tolerance
from accel.nn import TCN

KS = {"full": (3, 5, 7), "quick": (3, 7), "tiny": (3,)}
DILATIONS = {"full": (1, 4, 16, 64), "quick": (1, 64), "tiny": (1, 4)}
SHAPE1 = {"full": (512, 65536), "quick": (64, 4096), "tiny": (8, 256)}

GRID = {
    # (C values, L values, K values, d values)
    "full": ((256, 1024), (16384, 131072), (3, 7), (1, 64)),
    "quick": ((128,), (8192,), (3,), (1, 64)),
    "tiny": ((8,), (300,), (3,), (1, 64)),
}
DENSE = {"full": (256, 16384, 3, 4), "quick": (64, 4096, 3, 4), "tiny": (4, 128, 3, 4)}

TCN_C = {"full": 256, "quick": 32, "tiny": 4}
TCN_L = {"full": (16384, 32768, 65536, 131072), "quick": (4096,), "tiny": (256,)}

WARM = {"C": 8, "L": 512}  # small instance that warms up the memory worker


# --------------------------------------------------------------------------- builders

def build_conv(*, B: int, C: int, L: int, K: int, d: int, groups: int, mode: str, device: str, dtype: str,
               extra_peers: bool = False, seed: int = 0) -> Setup:
    """accel causal dilated conv vs nn.Conv1d(padding=(K-1)*d)[..., :L], same weights."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    span = (K - 1) * d
    conv = nn.Conv1d(C, C, K, groups=groups, dilation=d, padding=span)
    with torch.no_grad():  # deterministic weights, independent of the global RNG
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (conv.weight[0].numel() ** 0.5))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    conv = conv.to(device=device, dtype=dt)
    x = torch.randn(B, C, L, generator=g).to(device=device, dtype=dt)
    w, b = conv.weight, conv.bias

    def accel_fwd():
        return ops.dilated_conv1d(x, w, b, dilation=d, padding="causal", groups=groups)

    def peer_fwd():
        return conv(x)[..., :L]

    def pad_fwd():
        return F.conv1d(F.pad(x, (span, 0)), w, b, dilation=d, groups=groups)

    if mode == "fwd":
        conv.requires_grad_(False)
        out = torch.empty_like(x)
        impls = {"accel": accel_fwd, "nn.Conv1d": peer_fwd}
        if extra_peers:
            impls["F.pad+conv1d"] = pad_fwd
        impls["copy_"] = lambda: out.copy_(x)
        return Setup(impls)

    gy = torch.randn(B, C, L, generator=g).to(device=device, dtype=dt)
    impls = {"accel": accel_fwd, "nn.Conv1d": peer_fwd}
    if extra_peers:
        impls["F.pad+conv1d"] = pad_fwd
    return backward_setup(impls, (x, w, b), gy)


def build_tcn_fft(*, B: int, C: int, L: int, K: int, mode: str, device: str, dtype: str, seed: int = 0) -> Setup:
    """accel TCN (receptive field L) vs a causal FFT long convolution with an L-long kernel."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    tcn = TCN(C, kernel_size=K, receptive_field=L, activation="gelu")
    with torch.no_grad():  # small weights keep 17 residual layers finite
        for layer in tcn.layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * (0.5 / K))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.01)
    tcn = tcn.to(device=device, dtype=dt)
    x = torch.randn(B, C, L, generator=g).to(device=device, dtype=dt)
    # FFT peer parameters; rfft/irfft have no bf16 CPU kernels, so low precision computes in fp32
    fft_dt = dt if dt in (torch.float32, torch.float64) else torch.float32
    decay = torch.exp(-torch.arange(L, dtype=torch.float32) / (L / 8))
    k = (torch.randn(C, L, generator=g) * decay / L ** 0.5).to(device=device, dtype=fft_dt)
    D = torch.randn(C, 1, generator=g).to(device=device, dtype=fft_dt)
    n = 2 * L

    def fft_conv():
        xf = x.to(fft_dt)
        y = torch.fft.irfft(torch.fft.rfft(xf, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L] + D * xf
        return y.to(dt)

    if mode == "fwd":
        tcn.requires_grad_(False)
        return Setup({"accel TCN": tcn_fwd(tcn, x), "fft long conv": fft_conv})

    x.requires_grad_(True)
    k.requires_grad_(True)
    D.requires_grad_(True)
    gy = torch.randn(B, C, L, generator=g).to(device=device, dtype=dt)
    tcn_leaves = [x] + list(tcn.parameters())
    fft_leaves = [x, k, D]

    def reset():
        for t in tcn_leaves + fft_leaves:
            t.grad = None

    def tcn_run():
        reset()
        tcn(x).backward(gy)
        return None

    def fft_run():
        reset()
        fft_conv().backward(gy)
        return None

    return Setup({"accel TCN": tcn_run, "fft long conv": fft_run}, reset=reset)


def tcn_fwd(tcn, x):
    return lambda: tcn(x)


# --------------------------------------------------------------------------- cases

def _conv_case(group, C, L, K, d, groups, mode, args, *, bandwidth: bool, note: str = "") -> Case:
    params = dict(B=1, C=C, L=L, K=K, d=d, groups=groups, mode=mode, device=args.device, dtype=args.dtype,
                  extra_peers=bool(getattr(args, "extra_peers", False)))
    warm = dict(params, C=min(C, WARM["C"]), L=min(L, WARM["L"]), groups=min(C, WARM["C"]) if groups == C else 1)
    peers = ("nn.Conv1d", "F.pad+conv1d") if params["extra_peers"] else ("nn.Conv1d",)
    nbytes = C * L * element_size(args.dtype)
    depthwise = groups == C
    name = f"C{C} L{L} K{K} d{d}" + ("" if depthwise else " dense")
    bw = bandwidth and depthwise and mode == "fwd"
    return Case(
        op="conv", group=group, name=name, mode=mode, builder=build_conv, params=params, baseline="accel",
        peers=peers, aux=("copy_",) if mode == "fwd" else (), check=peers, tol=tolerance(args.dtype, mode),
        bw_bytes=2 * nbytes if bw else None, bw_ref="copy_" if bw else None,
        bw_ref_bytes=2 * nbytes if bw else None, warm_params=warm, note=note,
    )


def cases(args) -> List[Case]:
    size = args.size
    out: List[Case] = []
    modes = ("fwd", "fwd+bwd")

    C, L = SHAPE1[size]
    group = f"depthwise causal conv, {args.device} {args.dtype}"
    for mode in modes:
        for K in KS[size]:
            for d in DILATIONS[size]:
                out.append(_conv_case(group, C, L, K, d, C, mode, args, bandwidth=True,
                                      note="accel GB/s = (x read + y written) / median time; % is of the "
                                           "bandwidth of out.copy_(x) (fastest round) timed in the same rounds"))

    Cs, Ls, Ks, ds = GRID[size]
    group = f"issue grid, {args.device} {args.dtype}"
    for mode in modes:
        for C in Cs:
            for L in Ls:
                for K in Ks:
                    for d in ds:
                        out.append(_conv_case(group, C, L, K, d, C, mode, args, bandwidth=True))
        C, L, K, d = DENSE[size]
        out.append(_conv_case(group, C, L, K, d, 1, mode, args, bandwidth=False,
                              note="dense (groups=1) is compute-bound; reported for honesty"))

    C = TCN_C[size]
    group = f"TCN vs FFT long conv, {args.device} {args.dtype}"
    for mode in modes:
        for L in TCN_L[size]:
            params = dict(B=1, C=C, L=L, K=3, mode=mode, device=args.device, dtype=args.dtype)
            layers = TCN(1, 3, receptive_field=L, device="meta").layers
            out.append(Case(
                op="conv", group=group, name=f"C{C} L{L} ({len(layers)} layers)", mode=mode,
                builder=build_tcn_fft, params=params, baseline="accel TCN", peers=("fft long conv",),
                warm_params=dict(params, C=min(C, 8), L=min(L, 512)),
                note="ratio = fft time / TCN time; TCN: K=3, dilations 1..2^(n-1), receptive field >= L, fused "
                     "GELU + residual; FFT: n=2L rfft/irfft, L-long per-channel kernel, + D*x"
                     + ("" if args.dtype in ("float32", "float64") else "; FFT computed in float32"),
            ))
    return out
