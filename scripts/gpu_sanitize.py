"""Small launches of every CUDA kernel, meant to run under ``compute-sanitizer`` (memcheck).

Each op runs forward and backward on a few odd shapes (odd head dims, ragged lengths, empty
groups), so out-of-bounds reads or writes and misaligned accesses show up in the sanitizer's report.
Run from the repository root after a CUDA build:

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/gpu_sanitize.py
"""
from __future__ import annotations

import importlib
import sys

import torch

import accel.ops as ops

DEV = "cuda"


def attention() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d, lq, lk, kw in [(59, 113, 203, dict(causal=True)), (128, 1, 239, {}), (256, 108, 256, dict(window=(17, 3))),
                              (40, 129, 65, dict(alibi_slopes=torch.rand(4, device=DEV)))]:
            q = torch.randn(1, 4, lq, d, device=DEV, dtype=dtype, requires_grad=True)
            k = torch.randn(1, 2, lk, d, device=DEV, dtype=dtype, requires_grad=True)
            v = torch.randn(1, 2, lk, d, device=DEV, dtype=dtype, requires_grad=True)
            ops.sigmoid_attention(q, k, v, **kw).sum().backward()
        cu = torch.tensor([0, 5, 5, 70], device=DEV, dtype=torch.int32)
        q = torch.randn(70, 4, 96, device=DEV, dtype=dtype, requires_grad=True)
        k = torch.randn(70, 4, 96, device=DEV, dtype=dtype, requires_grad=True)
        v = torch.randn(70, 4, 96, device=DEV, dtype=dtype, requires_grad=True)
        ops.sigmoid_attention_varlen(q, k, v, cu, cu, 65, 65, causal=True).sum().backward()
        kc = torch.zeros(2, 4, 300, 64, device=DEV, dtype=dtype)
        vc = torch.zeros_like(kc)
        ops.sigmoid_attention_kvcache(torch.randn(2, 4, 1, 64, device=DEV, dtype=dtype), kc, vc,
                                      torch.tensor([0, 299], device=DEV, dtype=torch.int32),
                                      k_new=torch.randn(2, 4, 1, 64, device=DEV, dtype=dtype),
                                      v_new=torch.randn(2, 4, 1, 64, device=DEV, dtype=dtype))


def conv() -> None:
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 37, 257, device=DEV, dtype=dtype, requires_grad=True)
        w = torch.randn(37, 1, 5, device=DEV, dtype=dtype, requires_grad=True)
        ops.dilated_conv1d(x, w, None, dilation=3, groups=37).sum().backward()
        w2 = torch.randn(12, 37, 3, device=DEV, dtype=dtype, requires_grad=True)
        ops.dilated_conv1d(x, w2, None, dilation=2, padding="same").sum().backward()


def moe() -> None:
    if not hasattr(ops, "fused_moe"):
        return
    mod = importlib.import_module("accel.ops.fused_moe")
    for dtype in (torch.bfloat16, torch.float32):
        for T, E, H, I, k in [(0, 4, 64, 96, 2), (1, 8, 65, 33, 2), (37, 13, 130, 70, 4), (300, 4, 256, 128, 1)]:
            x = torch.randn(T, H, device=DEV, dtype=dtype, requires_grad=True)
            gu = (torch.randn(E, 2 * I, H, device=DEV, dtype=dtype) * H ** -0.5).requires_grad_()
            dn = (torch.randn(E, H, I, device=DEV, dtype=dtype) * I ** -0.5).requires_grad_()
            logits = torch.randn(T, E, device=DEV, dtype=dtype, requires_grad=True)
            mod.fused_moe(x, gu, dn, router_logits=logits, top_k=k).sum().backward()


if __name__ == "__main__":
    which = sys.argv[1:] or ["attention", "conv", "moe"]
    for name in which:
        globals()[name]()
        torch.cuda.synchronize()
        print(f"{name}: ok", flush=True)
