"""Inputs and the error measure shared by the partial_conv2d tests (CPU and CUDA)."""
import torch


def rel_error(a, b):
    """max |a - b| / max |b| in float64 on the CPU (0 for empty tensors)."""
    if b.numel() == 0:
        return 0.0
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def pconv_inputs(B, C, cp, H, W, dtype, channels_last, bias=True, seed=0):
    """x (B, C, H, W), weight (cp, cp, 3, 3) scaled to keep outputs O(1), bias (cp,) or None, and a
    grad_out like x; drawn in float64, then cast, so every dtype sees the same values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(cp, cp, 3, 3, generator=g, dtype=torch.float64) / (3 * cp ** 0.5)).to(dtype)
    b = torch.randn(cp, generator=g, dtype=torch.float64).to(dtype) if bias else None
    gy = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, gy
