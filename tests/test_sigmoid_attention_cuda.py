"""CUDA kernels of accel.ops.sigmoid_attention (dense, varlen, kvcache), forward and backward.

Oracle: accel.reference.sigmoid_attention in float64 on the GPU. fp16/bf16 kernels must be within
twice the error of the eager formula run in the same low precision (plus a tiny floor); the fp32
kernels are held to a tight tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from accel import _ext  # noqa: E402
from accel.ops.sigmoid_attention import (  # noqa: E402
    sigmoid_attention,
    sigmoid_attention_kvcache,
    sigmoid_attention_varlen,
)
from accel.reference.sigmoid_attention import sigmoid_attention as reference  # noqa: E402

if torch.cuda.is_available() and not _ext.build_info().get("cuda", False):
    pytestmark.append(pytest.mark.skip(reason="accel was built without CUDA kernels"))

DEV = "cuda"
LOW = [torch.float16, torch.bfloat16]
DIMS = [32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256]
LENGTHS = [(1, 1), (1, 239), (113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (1023, 1024),
           (1024, 1023), (2048, 2048)]
OPTIONS = ["plain", "causal", "window", "alibi", "gqa", "mqa_causal", "bias_tensor", "window_alibi_gqa",
           "bias_scalar_causal"]


# ----------------------------------------------------------------------------- helpers

def alibi_slopes(h, batch=None):
    s = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device=DEV)
    return s if batch is None else s.unsqueeze(0).repeat(batch, 1) * torch.linspace(0.5, 1.5, batch, device=DEV)[:, None]


def configure(option, B, lq, lk, gen, hq=4):
    """(H_q, H_kv, kwargs) of an option name."""
    hkv, kw = hq, {}
    if option == "causal":
        kw["causal"] = True
    elif option == "window":
        kw["window"] = (min(97, lk // 3 + 1), 13)
    elif option == "alibi":
        kw["alibi_slopes"] = alibi_slopes(hq)
    elif option == "gqa":
        hkv = hq // 2
    elif option == "mqa_causal":
        hkv, kw["causal"] = 1, True
    elif option == "bias_tensor":
        kw["bias"] = (torch.rand(hq, generator=gen) * 12 - 10).to(DEV)  # U(-10, 2)
    elif option == "window_alibi_gqa":
        hkv = hq // 2
        kw["window"] = (50, -1)
        kw["alibi_slopes"] = alibi_slopes(hq, batch=B)
    elif option == "bias_scalar_causal":
        kw["bias"], kw["causal"] = -3.0, True
    return hq, hkv, kw


def make_inputs(B, hq, hkv, lq, lk, d, *, layout="bhld", gen=None):
    """fp32 q, k, v, grad_out on the GPU; layout "blhd" gives (B, H, L, D) views of (B, L, H, D) memory."""
    def one(h, length):
        if layout == "blhd":
            return torch.randn(B, length, h, d, generator=gen).to(DEV).transpose(1, 2)
        return torch.randn(B, h, length, d, generator=gen).to(DEV)
    return one(hq, lq), one(hkv, lk), one(hkv, lk), one(hq, lq)


def cast(t, dtype):
    return t.to(dtype)  # preserve_format: a transposed view stays a transposed view


def cast_kw(kw, dtype):
    out = dict(kw)
    for name in ("alibi_slopes", "bias"):
        if isinstance(out.get(name), torch.Tensor):
            out[name] = out[name].to(dtype)
    return out


def fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return [o.detach(), dq, dk, dv]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if b.numel() else 0.0


def scale_of(t):
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


NAMES = ["out", "dq", "dk", "dv"]


def check_low_precision(got, eager, truth, what):
    for name, g, e, t in zip(NAMES, got, eager, truth):
        assert g.shape == t.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite values"
        err, ref_err = max_err(g, t), max_err(e, t)
        tol = 2 * ref_err + 1e-4 * scale_of(t)
        assert err <= tol, f"{what} {name}: kernel error {err:.3g} > 2 x eager error {ref_err:.3g} + floor"


def check_close(got, truth, rtol, what):
    for name, g, t in zip(NAMES, got, truth):
        assert g.shape == t.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        err = max_err(g, t)
        assert err <= rtol * scale_of(t), f"{what} {name}: max abs error {err:.3g} > {rtol:g} * {scale_of(t):.3g}"


def grid_cases():
    cases = []
    for i, d in enumerate(DIMS):
        for r in range(3):
            lq, lk = LENGTHS[(3 * i + r) % len(LENGTHS)]
            cases.append((d, lq, lk, OPTIONS[(i + 4 * r) % len(OPTIONS)], "blhd" if (i + r) % 2 else "bhld"))
    return cases


# ----------------------------------------------------------------------------- dense grid, fp16/bf16

@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d,lq,lk,option,layout", grid_cases())
def test_dense_low_precision(d, lq, lk, option, layout, dtype):
    gen = torch.Generator().manual_seed(d * 7919 + lq * 31 + lk)
    big = lq * lk > 1_000_000
    B = 1 if big else 2
    hq, hkv, kw = configure(option, B, lq, lk, gen, hq=2 if big else 4)
    q, k, v, do = make_inputs(B, hq, hkv, lq, lk, d, layout=layout, gen=gen)
    low = [cast(t, dtype) for t in (q, k, v, do)]
    # the truth sees the same (rounded) inputs: the errors below measure the computation only
    truth = fwd_bwd(reference, *(cast(t, torch.float64) for t in low), **cast_kw(kw, torch.float64))
    eager = fwd_bwd(reference, *low, **cast_kw(kw, dtype))
    got = fwd_bwd(sigmoid_attention, *low, **kw)
    assert got[0].dtype == dtype and got[0].is_contiguous() and all(g.is_contiguous() for g in got[1:])
    check_low_precision(got, eager, truth, f"{dtype} D={d} L=({lq},{lk}) {option} {layout}")


# ----------------------------------------------------------------------------- fp32

FP32_CASES = [(32, 113, 203, "causal"), (59, 1, 239, "alibi"), (128, 256, 512, "window_alibi_gqa"),
              (256, 1024, 1023, "bias_tensor"), (64, 512, 256, "mqa_causal"), (160, 128, 217, "plain"),
              (111, 108, 256, "bias_scalar_causal")]


@pytest.mark.parametrize("d,lq,lk,option", FP32_CASES)
def test_dense_fp32(d, lq, lk, option):
    gen = torch.Generator().manual_seed(d + lq + lk)
    hq, hkv, kw = configure(option, 2, lq, lk, gen)
    q, k, v, do = make_inputs(2, hq, hkv, lq, lk, d, layout="blhd" if d % 2 else "bhld", gen=gen)
    truth = fwd_bwd(reference, *(cast(t, torch.float64) for t in (q, k, v, do)), **cast_kw(kw, torch.float64))
    got = fwd_bwd(sigmoid_attention, q, k, v, do, **kw)
    assert got[0].dtype == torch.float32
    check_close(got, truth, 5e-5, f"fp32 D={d} L=({lq},{lk}) {option}")


# ----------------------------------------------------------------------------- layouts and edge values

@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
def test_misaligned_and_strided_inputs(dtype):
    # q starts 2 elements into its buffer (not 16-byte aligned) and has a padded row stride; this
    # takes the kernels' scalar load path, and must agree with contiguous inputs.
    gen = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 3, 150, 64
    buf = torch.randn(B, H, L, D + 10, generator=gen).to(DEV, dtype)
    q = buf[..., 2:2 + D]
    k = torch.randn(B, L, H, D, generator=gen).to(DEV, dtype).transpose(1, 2)
    v = torch.randn(B, H, L, D, generator=gen).to(DEV, dtype)
    do = torch.randn(B, H, L, D, generator=gen).to(DEV, dtype)
    got = fwd_bwd(sigmoid_attention, q, k, v, do, causal=True)
    want = fwd_bwd(sigmoid_attention, q.contiguous(), k.contiguous(), v, do, causal=True)
    check_close(got, want, 1e-2 if dtype != torch.float32 else 1e-5, f"{dtype} misaligned")


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
def test_extreme_logits_and_fully_masked_rows(dtype):
    # bias -1e4 / +1e4: sigmoid must give exactly 0 / 1, never NaN. A window that leaves the first
    # rows without keys: those rows are 0, and so are their gradients.
    B, H, L, D = 1, 2, 70, 32
    q, k, v, do = (t.to(dtype) for t in make_inputs(B, H, H, L, L, D, gen=torch.Generator().manual_seed(1)))
    o = sigmoid_attention(q, k, v, bias=-1e4)
    assert torch.isfinite(o).all() and o.abs().max().item() == 0
    o = sigmoid_attention(q, k, v, bias=1e4)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.float(), v.float().sum(2, keepdim=True).expand_as(o), rtol=2e-2, atol=2e-1)
    lq, lk = 40, 20  # bottom-right aligned: query i sits at key i - 20; window (0, 0) -> rows < 20 see nothing
    q, k, v, do = (t.to(dtype) for t in make_inputs(B, H, H, lq, lk, D, gen=torch.Generator().manual_seed(2)))
    got = fwd_bwd(sigmoid_attention, q, k, v, do, window=(0, 0))
    assert got[0][:, :, :20].abs().max().item() == 0 and got[1][:, :, :20].abs().max().item() == 0
    truth = fwd_bwd(reference, *(t.double() for t in (q, k, v, do)), window=(0, 0))
    check_close(got, truth, 1e-2 if dtype != torch.float32 else 1e-5, f"{dtype} window (0, 0)")


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", [(0, 2, 5, 7, 64), (2, 2, 0, 7, 64), (2, 2, 5, 0, 64), (1, 3, 0, 0, 32)])
def test_zero_size(shape, dtype):
    B, H, lq, lk, D = shape
    q, k, v, do = (t.to(dtype) for t in make_inputs(B, H, H, lq, lk, D, gen=torch.Generator().manual_seed(0)))
    got = fwd_bwd(sigmoid_attention, q, k, v, do)
    for g, ref in zip(got, (q, q, k, v)):
        assert g.shape == ref.shape and (g.numel() == 0 or g.abs().max().item() == 0)


# ----------------------------------------------------------------------------- varlen

VARLEN_SEQS = [(113, 203), (1, 239), (0, 5), (256, 512), (77, 0), (64, 64), (130, 17)]


@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d,option", [(64, "causal"), (111, "window_alibi_gqa"), (128, "bias_tensor"),
                                      (40, "mqa_causal"), (256, "alibi")])
def test_varlen_equals_each_sequence_alone(d, option, dtype):
    gen = torch.Generator().manual_seed(d)
    seqs = VARLEN_SEQS
    B = len(seqs)
    hq, hkv, kw = configure(option, B, 100, 100, gen)
    cu_q = torch.tensor([0] + [sum(a for a, _ in seqs[:i + 1]) for i in range(B)], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + [sum(b for _, b in seqs[:i + 1]) for i in range(B)], dtype=torch.int32, device=DEV)
    pad = 5  # packed rows after the last sequence: outputs and gradients there are 0
    tq, tk = int(cu_q[-1]) + pad, int(cu_k[-1]) + pad
    q = torch.randn(tq, hq, d, generator=gen).to(DEV, dtype)
    k = torch.randn(tk, hkv, d, generator=gen).to(DEV, dtype)
    v = torch.randn(tk, hkv, d, generator=gen).to(DEV, dtype)
    do = torch.randn(tq, hq, d, generator=gen).to(DEV, dtype)
    max_q, max_k = max(a for a, _ in seqs), max(b for _, b in seqs)
    got = fwd_bwd(lambda q_, k_, v_, **kw_: sigmoid_attention_varlen(q_, k_, v_, cu_q, cu_k, max_q, max_k, **kw_),
                  q, k, v, do, **kw)
    for g in got[:2]:
        assert g[-pad:].abs().max().item() == 0
    for g in got[2:]:
        assert g[-pad:].abs().max().item() == 0
    tol = 1e-5 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
    for b, (lq, lk) in enumerate(seqs):
        qs, ks = int(cu_q[b]), int(cu_k[b])
        sl = lambda t, s, n: t[s:s + n].transpose(0, 1).unsqueeze(0)  # noqa: E731
        kw_b = dict(kw)
        if "alibi_slopes" in kw and kw["alibi_slopes"].dim() == 2:
            kw_b["alibi_slopes"] = kw["alibi_slopes"][b]
        alone = fwd_bwd(sigmoid_attention, sl(q, qs, lq), sl(k, ks, lk), sl(v, ks, lk), sl(do, qs, lq), **kw_b)
        mine = [sl(got[0], qs, lq), sl(got[1], qs, lq), sl(got[2], ks, lk), sl(got[3], ks, lk)]
        check_close(mine, alone, tol, f"{dtype} D={d} {option} sequence {b} ({lq}, {lk})")
        if dtype != torch.float32 and lq and lk:
            truth = fwd_bwd(reference, *(t.double() for t in (sl(q, qs, lq), sl(k, ks, lk), sl(v, ks, lk),
                                                              sl(do, qs, lq))), **cast_kw(kw_b, torch.float64))
            eager = fwd_bwd(reference, sl(q, qs, lq), sl(k, ks, lk), sl(v, ks, lk), sl(do, qs, lq),
                            **cast_kw(kw_b, dtype))
            check_low_precision(mine, eager, truth, f"{dtype} D={d} {option} sequence {b} vs reference")


# ----------------------------------------------------------------------------- kv cache

@pytest.mark.parametrize("dtype", LOW + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d,n_new,lmax", [(128, 1, 1024), (64, 3, 4096), (96, 0, 300), (256, 1, 2048)])
def test_kvcache_decode_equals_full_attention(d, n_new, lmax, dtype):
    gen = torch.Generator().manual_seed(d + n_new)
    B, hq, hkv = 3, 8, 2
    cache_seqlens = torch.tensor([0 if n_new else 1, lmax // 2 - 7, lmax - max(n_new, 1)], dtype=torch.int32,
                                 device=DEV)
    k_cache = torch.randn(B, hkv, lmax, d, generator=gen).to(DEV, dtype)
    v_cache = torch.randn(B, hkv, lmax, d, generator=gen).to(DEV, dtype)
    for b in range(B):  # whatever lies beyond the valid keys must never be read
        k_cache[b, :, int(cache_seqlens[b]) + n_new:] = float("nan")
        v_cache[b, :, int(cache_seqlens[b]) + n_new:] = float("nan")
    q = torch.randn(B, hq, max(n_new, 1), d, generator=gen).to(DEV, dtype)
    k_new = torch.randn(B, hkv, n_new, d, generator=gen).to(DEV, dtype) if n_new else None
    v_new = torch.randn(B, hkv, n_new, d, generator=gen).to(DEV, dtype) if n_new else None
    slopes = alibi_slopes(hq)
    out = sigmoid_attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, alibi_slopes=slopes)
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
    for b in range(B):
        n = int(cache_seqlens[b]) + n_new
        kb, vb = k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n]
        if n_new:
            torch.testing.assert_close(k_cache[b, :, n - n_new:n], k_new[b])
        full = sigmoid_attention(q[b:b + 1], kb, vb, causal=True, alibi_slopes=slopes)
        check_close([out[b:b + 1]], [full], tol, f"kvcache batch {b} vs full attention")
        truth = reference(q[b:b + 1].double(), kb.double(), vb.double(), causal=True, alibi_slopes=slopes.double())
        if dtype == torch.float32:
            check_close([out[b:b + 1]], [truth], 5e-5, f"kvcache batch {b} vs reference")
        else:
            eager = reference(q[b:b + 1], kb, vb, causal=True, alibi_slopes=slopes.to(dtype))
            err, ref_err = max_err(out[b:b + 1], truth), max_err(eager, truth)
            assert err <= 2 * ref_err + 1e-4 * scale_of(truth), f"kvcache batch {b}: {err:.3g} vs eager {ref_err:.3g}"


def test_seqused_k_gradients_and_default_bias():
    # Dense op with seqused_k (the kvcache path) in training: keys past seqused_k get zero grads,
    # and the default bias is -log(seqused_k[b]).
    gen = torch.Generator().manual_seed(11)
    B, H, lq, lk, d = 2, 2, 37, 300, 64
    q, k, v, do = (t.to(torch.bfloat16) for t in make_inputs(B, H, H, lq, lk, d, gen=gen))
    used = torch.tensor([300, 123], dtype=torch.int32, device=DEV)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = torch.ops.accel.sigmoid_attention_fwd(q, k, v, None, None, used, lq, lk, 1 / math.sqrt(d), None, None,
                                              False, -1, -1, None)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert dk[1, :, 123:].abs().max().item() == 0 and dv[1, :, 123:].abs().max().item() == 0
    truth = fwd_bwd(lambda a, b_, c: reference(a, b_, c, seqused_k=used), *(t.double() for t in (q, k, v, do)))
    eager = fwd_bwd(lambda a, b_, c: reference(a, b_, c, seqused_k=used), q.detach(), k.detach(), v.detach(), do)
    truth[2][1, :, 123:] = 0
    truth[3][1, :, 123:] = 0
    check_low_precision([o.detach(), dq, dk, dv], eager, truth, "seqused_k")


# ----------------------------------------------------------------------------- torch.compile, CUDA graphs, opcheck

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_torch_compile_fullgraph(dtype):
    gen = torch.Generator().manual_seed(5)
    q, k, v, do = (t.to(dtype) for t in make_inputs(2, 4, 2, 100, 130, 64, gen=gen))

    def f(q, k, v):
        return sigmoid_attention(q, k, v, causal=True, bias=-2.0) * 2

    compiled = torch.compile(f, fullgraph=True)
    got = fwd_bwd(compiled, q, k, v, do)
    want = fwd_bwd(f, q, k, v, do)
    check_close(got, want, 1e-5 if dtype == torch.float32 else 1e-2, f"compile {dtype}")


def test_cuda_graph_capture_forward_and_backward():
    gen = torch.Generator().manual_seed(6)
    q, k, v, do = (t.to(torch.float16) for t in make_inputs(2, 4, 2, 200, 300, 128, gen=gen))
    args = (None, None, None, 200, 300, 1 / math.sqrt(128), None, None, True, -1, -1, None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        for _ in range(2):
            sigmoid_attention(q, k, v, causal=True)
            torch.ops.accel.sigmoid_attention_bwd(do, q, k, v, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sigmoid_attention(q, k, v, causal=True)
        grads = torch.ops.accel.sigmoid_attention_bwd(do, q, k, v, *args)
    for seed in (7, 8):
        g2 = torch.Generator().manual_seed(seed)
        for t, new in zip((q, k, v, do), make_inputs(2, 4, 2, 200, 300, 128, gen=g2)):
            t.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = fwd_bwd(sigmoid_attention, q, k, v, do, causal=True)
        check_close([out, *grads], want, 1e-2, f"graph replay {seed}")


def test_cuda_graph_capture_kvcache_decode():
    # The usual decode loop: static buffers, cache_seqlens advanced on the device between replays.
    gen = torch.Generator().manual_seed(9)
    B, hq, hkv, lmax, d = 2, 8, 2, 2048, 64
    k_cache = torch.randn(B, hkv, lmax, d, generator=gen).to(DEV, torch.bfloat16)
    v_cache = torch.randn(B, hkv, lmax, d, generator=gen).to(DEV, torch.bfloat16)
    q = torch.randn(B, hq, 1, d, generator=gen).to(DEV, torch.bfloat16)
    k_new = torch.randn(B, hkv, 1, d, generator=gen).to(DEV, torch.bfloat16)
    v_new = torch.randn(B, hkv, 1, d, generator=gen).to(DEV, torch.bfloat16)
    seqlens = torch.tensor([10, 1500], dtype=torch.int32, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sigmoid_attention_kvcache(q, k_cache, v_cache, seqlens, k_new, v_new)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sigmoid_attention_kvcache(q, k_cache, v_cache, seqlens, k_new, v_new)
    for step in range(3):
        seqlens += 1
        q.normal_()
        k_new.normal_()
        v_new.normal_()
        graph.replay()
        torch.cuda.synchronize()
        for b in range(B):
            n = int(seqlens[b]) + 1
            want = sigmoid_attention(q[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n], causal=True)
            check_close([out[b:b + 1]], [want], 8 * torch.finfo(torch.bfloat16).eps, f"decode step {step} batch {b}")


def test_kv_cache_append_in_a_graph_writes_where_the_device_lengths_say():
    """Captured once, the append reads each replay's lengths on the device; a row whose new tokens do
    not fit is left unwritten, and nothing lands outside the cache (guard rows around it stay zero)."""
    B, hkv, lmax, d, n_new = 3, 2, 64, 40, 2
    store_k = torch.zeros(B, hkv, lmax + 2, d, device=DEV, dtype=torch.float16)
    store_v = torch.zeros_like(store_k)
    k_cache, v_cache = store_k[:, :, 1:-1], store_v[:, :, 1:-1]  # strided views between guard rows
    k_new = torch.zeros(B, hkv, n_new, d, device=DEV, dtype=torch.float16)
    v_new = torch.zeros_like(k_new)
    lens = torch.zeros(B, dtype=torch.int32, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        torch.ops.accel.kv_cache_append(k_cache, v_cache, k_new, v_new, lens)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.accel.kv_cache_append(k_cache, v_cache, k_new, v_new, lens)
    want_k, want_v = store_k.clone(), store_v.clone()
    for new_lens in ([0, 5, 62], [2, 63, -1], [62, 10, 40], [lmax, 2**31 - 1, 7]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        k_new.normal_()
        v_new.normal_()
        graph.replay()
        for b, n in enumerate(new_lens):
            if 0 <= n <= lmax - n_new:
                want_k[b, :, 1 + n:1 + n + n_new] = k_new[b]
                want_v[b, :, 1 + n:1 + n + n_new] = v_new[b]
        torch.cuda.synchronize()
        assert torch.equal(store_k, want_k) and torch.equal(store_v, want_v), f"lengths {new_lens}"
    assert not want_k[:, :, 0].any() and not want_k[:, :, -1].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_kv_cache_append_matches_cpu_and_passes_opcheck(dtype):
    gen = torch.Generator().manual_seed(12)
    kc, vc = (torch.randn(2, 3, 20, 72, generator=gen).to(dtype) for _ in range(2))
    kn, vn = (torch.randn(2, 5, 3, 72, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    lens = torch.tensor([4, 17], dtype=torch.int32)
    args_cuda = [t.to(DEV) for t in (kc, vc, kn, vn, lens)]
    torch.ops.accel.kv_cache_append(kc, vc, kn, vn, lens)
    torch.ops.accel.kv_cache_append(*args_cuda)
    assert torch.equal(args_cuda[0].cpu(), kc) and torch.equal(args_cuda[1].cpu(), vc)
    torch.library.opcheck(torch.ops.accel.kv_cache_append, tuple(t.clone() for t in args_cuda))


def test_opcheck():
    gen = torch.Generator().manual_seed(10)
    q, k, v, _ = (t.to(torch.float16) for t in make_inputs(1, 2, 1, 33, 70, 64, gen=gen))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, None, None, None, 33, 70, 0.125, None, -1.0, True, -1, -1, None)
    torch.library.opcheck(torch.ops.accel.sigmoid_attention_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_errors():
    q, k, v, _ = make_inputs(1, 2, 2, 8, 8, 64, gen=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="float16.*bfloat16.*float32"):
        sigmoid_attention(q.double(), k.double(), v.double())
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        big = torch.randn(1, 2, 8, 264, device=DEV, dtype=torch.float16)
        sigmoid_attention(big, big, big)
    with pytest.raises(TypeError, match="dtype"):
        sigmoid_attention(q.half(), k.bfloat16(), v.half())
    with pytest.raises(ValueError, match="device"):
        sigmoid_attention(q, k.cpu(), v)
    with pytest.raises(ValueError, match="multiple"):
        sigmoid_attention(q[:, :2].half(), torch.randn(1, 3, 8, 64, device=DEV, dtype=torch.float16),
                          torch.randn(1, 3, 8, 64, device=DEV, dtype=torch.float16))
    cu = torch.tensor([0, 8], dtype=torch.int32)  # on the CPU while q is on the GPU
    with pytest.raises(ValueError, match="device"):
        qv = q[0].transpose(0, 1).half()
        torch.ops.accel.sigmoid_attention_fwd(qv, qv, qv, cu, cu, None, 8, 8, 0.125, None, None, False, -1, -1, None)
