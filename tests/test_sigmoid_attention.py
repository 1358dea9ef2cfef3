"""CPU sigmoid attention vs the eager reference: forward, gradients, varlen, KV cache, errors, compile."""
import math
import os
import subprocess
import sys

import pytest
import torch

import accel
from accel import reference as ref
from accel.ops import sigmoid_attention, sigmoid_attention_kvcache, sigmoid_attention_varlen

HEAD_DIMS = [32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256]
LENGTHS = [(1, 1), (1, 239), (113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (1023, 1024),
           (1024, 1023), (2048, 2048)]
# (Hq, Hkv): MHA, GQA, MQA
HEADS = [(4, 4), (4, 2), (3, 1)]
MASKS = [
    dict(),
    dict(causal=True),
    dict(window=(37, 11)),
    dict(alibi=True),
    dict(causal=True, window=(64, -1), alibi=True),
]


def _slopes(hq, batch=None):
    # the standard ALiBi slopes 2^(-8 i / H), rounded to fp32 (the kernels read slopes in fp32)
    s = torch.tensor([2.0 ** (-8.0 * (i + 1) / hq) for i in range(hq)], dtype=torch.float64)
    if batch is not None:
        s = s.unsqueeze(0) * torch.tensor([1.0, 0.5, 0.25, 2.0][:batch], dtype=torch.float64).unsqueeze(1)
    return s.float().double()


def _inputs(B, hq, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, hkv, lk, d, generator=g, dtype=torch.float64)
    bias = torch.empty(hq, dtype=torch.float64).uniform_(-10, 2, generator=g)
    # bias in fp32-exact values, so that the fp32-converted per-head tensor equals the reference's
    bias = bias.float().double()
    return q.to(dtype), k.to(dtype), v.to(dtype), bias


def _kwargs(mask, hq, B, bias):
    kw = dict(bias=bias)
    if mask.get("causal"):
        kw["causal"] = True
    if "window" in mask:
        kw["window"] = mask["window"]
    if mask.get("alibi"):
        kw["alibi_slopes"] = _slopes(hq, B if B > 1 else None)
    return kw


def _run(fn, q, k, v, g, **kw):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    v = v.detach().requires_grad_()
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    return [out.detach(), *grads]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _cases():
    cases = []
    for n, (lq, lk) in enumerate(LENGTHS):
        # every pair meets several head dims, mask kinds and head layouts
        ds = [HEAD_DIMS[(3 * n + j) % len(HEAD_DIMS)] for j in range(3 if lq * lk < 600_000 else 1)]
        for j, d in enumerate(ds):
            mask = MASKS[(n + j) % len(MASKS)]
            heads = HEADS[(n + 2 * j) % len(HEADS)]
            cases.append((lq, lk, d, heads, mask))
    # every head dim at least once with a mid-size problem
    for j, d in enumerate(HEAD_DIMS):
        cases.append((97, 131, d, HEADS[j % 3], MASKS[j % len(MASKS)]))
    return cases


def _case_id(c):
    lq, lk, d, (hq, hkv), mask = c
    return f"L{lq}x{lk}-D{d}-H{hq}/{hkv}-" + ("+".join(k for k in mask) or "full")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_matches_reference(case, dtype):
    """Kernel error vs the fp64 reference is at most twice that of the eager formula in the same dtype."""
    lq, lk, d, (hq, hkv), mask = case
    B = 2 if lq * lk <= 300_000 else 1
    q, k, v, bias = _inputs(B, hq, hkv, lq, lk, d, torch.float64, seed=lq + 7 * lk + d)
    kw = _kwargs(mask, hq, B, bias)
    g = torch.randn(B, hq, lq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = _run(ref.sigmoid_attention, q, k, v, g, **kw)
    low = [t.to(dtype) for t in (q, k, v)]
    eager = _run(ref.sigmoid_attention, *low, g.to(dtype), **kw)
    fused = _run(sigmoid_attention, *low, g.to(dtype), **kw)
    assert fused[0].dtype == dtype and fused[0].shape == (B, hq, lq, d)
    for name, f, e, x in zip(("out", "dq", "dk", "dv"), fused, eager, exact):
        scale = x.abs().max().item() + 1e-30
        floor = (1e-6 if dtype == torch.float32 else 1e-3) * scale
        assert _err(f, x) <= 2 * _err(e, x) + floor, (name, _err(f, x), _err(e, x), scale)


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "+".join(m) or "full")
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}/{h[1]}")
def test_fp64_matches_reference_exactly(mask, heads):
    hq, hkv = heads
    q, k, v, bias = _inputs(2, hq, hkv, 70, 93, 24, torch.float64)
    kw = _kwargs(mask, hq, 2, bias)
    g = torch.randn(2, hq, 70, 24, dtype=torch.float64)
    for f, r in zip(_run(sigmoid_attention, q, k, v, g, **kw), _run(ref.sigmoid_attention, q, k, v, g, **kw)):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("mask", MASKS[:3] + [dict(causal=True, alibi=True)], ids=lambda m: "+".join(m) or "full")
def test_gradcheck_fp64(mask):
    q, k, v, _ = _inputs(1, 2, 1, 9, 13, 5, torch.float64)
    kw = _kwargs(mask, 2, 1, None)
    kw.pop("bias")
    kw["bias"] = -1.0
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: sigmoid_attention(a, b, c, **kw), (q, k, v))


@pytest.mark.parametrize("lq", [1, 5, 16, 17])  # <= 16 rows: the decode kernel; 17: the tiled one
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "+".join(m) or "full")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_few_query_rows_over_long_keys(lq, mask, dtype):
    q, k, v, bias = _inputs(2, 4, 2, lq, 1300, 48, torch.float64, seed=lq)
    kw = _kwargs(mask, 4, 2, bias)
    exact = ref.sigmoid_attention(q, k, v, **kw)
    eager = ref.sigmoid_attention(*(t.to(dtype) for t in (q, k, v)), **kw)
    out = sigmoid_attention(*(t.to(dtype) for t in (q, k, v)), **kw)
    floor = (1e-6 if dtype == torch.float32 else 1e-3) * exact.abs().max().item()
    assert _err(out, exact) <= 2 * _err(eager, exact) + floor


def test_default_bias_and_scale():
    q, k, v, _ = _inputs(1, 2, 2, 17, 29, 16, torch.float32)
    out = sigmoid_attention(q, k, v)
    expect = torch.sigmoid(q @ k.transpose(-1, -2) / 4.0 - math.log(29)) @ v
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    out = sigmoid_attention(q, k, v, scale=0.3, bias=1.5)
    expect = torch.sigmoid(q @ k.transpose(-1, -2) * 0.3 + 1.5) @ v
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_extreme_logits_saturate_without_nan():
    q, k, v, _ = _inputs(1, 1, 1, 33, 40, 8, torch.float32)
    # sigmoid(-1e4) is 0 to fp32 precision (the kernel's 2^t saturates at 2^126)
    assert sigmoid_attention(q, k, v, bias=-1e4).abs().max().item() < 1e-30
    torch.testing.assert_close(sigmoid_attention(q, k, v, bias=1e4), v.sum(2, keepdim=True).expand(1, 1, 33, 8))
    q = q * 1e6
    out = sigmoid_attention(q, k, v)
    assert torch.isfinite(out).all()


def test_strided_inputs_need_no_copy():
    B, L, H, D = 2, 45, 4, 32
    x = torch.randn(B, L, 3, H, D)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D), last dim contiguous
    assert not q.is_contiguous()
    torch.testing.assert_close(sigmoid_attention(q, k, v, causal=True),
                               ref.sigmoid_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True),
                               rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero():
    # Lq > Lk with causal: the first Lq - Lk query rows see no key (bottom-right alignment)
    q, k, v, _ = _inputs(1, 2, 2, 20, 8, 16, torch.float32)
    q.requires_grad_()
    out = sigmoid_attention(q, k, v, causal=True)
    assert out[:, :, :12].abs().max().item() == 0.0
    torch.testing.assert_close(out, ref.sigmoid_attention(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert q.grad[:, :, :12].abs().max().item() == 0.0


def test_empty_sizes():
    q = torch.randn(1, 2, 0, 16)
    k = torch.randn(1, 2, 5, 16)
    assert sigmoid_attention(q, k, k).shape == (1, 2, 0, 16)
    q = torch.randn(1, 2, 3, 16)
    k = torch.randn(1, 2, 0, 16)
    assert sigmoid_attention(q, k, k).abs().sum().item() == 0.0


# ---------------------------------------------------------------- varlen

def _pack(seqs):
    return torch.cat(seqs, 0), torch.tensor([0] + list(torch.tensor([s.shape[0] for s in seqs]).cumsum(0)),
                                             dtype=torch.int32)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window=(5, 3), alibi=True), dict(bias=0.5)],
                         ids=["full", "causal", "window+alibi", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_varlen_equals_each_sequence_alone(kw, dtype):
    lens_q = [5, 0, 70, 1, 33]
    lens_k = [9, 4, 70, 17, 31]
    hq, hkv, d = 4, 2, 24
    g = torch.Generator().manual_seed(3)
    qs = [torch.randn(n, hq, d, generator=g, dtype=dtype) for n in lens_q]
    ks = [torch.randn(n, hkv, d, generator=g, dtype=dtype) for n in lens_k]
    vs = [torch.randn(n, hkv, d, generator=g, dtype=dtype) for n in lens_k]
    q, cu_q = _pack(qs)
    k, cu_k = _pack(ks)
    v, _ = _pack(vs)
    kw = dict(kw)
    slopes = _slopes(hq, None) if kw.pop("alibi", False) else None
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = sigmoid_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), alibi_slopes=slopes, **kw)
    go = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    for b in range(len(lens_q)):
        sq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        sk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        qb, kb, vb = (t.detach()[s].transpose(0, 1).unsqueeze(0).requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        ob = sigmoid_attention(qb, kb, vb, alibi_slopes=slopes, **kw)
        torch.testing.assert_close(out[sq], ob[0].transpose(0, 1), **tol)
        if ob.numel():
            gq, gk, gv = torch.autograd.grad(ob, (qb, kb, vb), go[sq].transpose(0, 1).unsqueeze(0))
            torch.testing.assert_close(dq[sq], gq[0].transpose(0, 1), **tol)
            torch.testing.assert_close(dk[sk], gk[0].transpose(0, 1), **tol)
            torch.testing.assert_close(dv[sk], gv[0].transpose(0, 1), **tol)
    # the reference's own varlen loop agrees too
    torch.testing.assert_close(out.detach(), ref.sigmoid_attention_varlen(q.detach(), k.detach(), v.detach(), cu_q, cu_k,
                                                                          alibi_slopes=slopes, **kw), **tol)


def test_varlen_default_bias_is_per_sequence():
    d = 8
    qa, ka = torch.randn(3, 1, d), torch.randn(10, 1, d)
    qb, kb = torch.randn(2, 1, d), torch.randn(100, 1, d)
    q, cu_q = _pack([qa, qb])
    k, cu_k = _pack([ka, kb])
    out = sigmoid_attention_varlen(q, k, k, cu_q, cu_k, 3, 100)
    ea = torch.sigmoid(qa[:, 0] @ ka[:, 0].T / math.sqrt(d) - math.log(10)) @ ka[:, 0]
    eb = torch.sigmoid(qb[:, 0] @ kb[:, 0].T / math.sqrt(d) - math.log(100)) @ kb[:, 0]
    torch.testing.assert_close(out[:3, 0], ea, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3:, 0], eb, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("n_new", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvcache_decode_equals_full_attention(n_new, dtype):
    B, hq, hkv, d, lmax = 3, 4, 2, 32, 64
    cache_lens = torch.tensor([0, 17, 40], dtype=torch.int32)
    k_cache = torch.randn(B, hkv, lmax, d).to(dtype)
    v_cache = torch.randn(B, hkv, lmax, d).to(dtype)
    k_new = torch.randn(B, hkv, n_new, d).to(dtype)
    v_new = torch.randn(B, hkv, n_new, d).to(dtype)
    q = torch.randn(B, hq, n_new, d).to(dtype)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    out = sigmoid_attention_kvcache(q, k_cache, v_cache, cache_lens, k_new, v_new)
    for b in range(B):
        n = int(cache_lens[b])
        # appended in place, the rest of the cache untouched
        assert torch.equal(k_cache[b, :, n:n + n_new], k_new[b]) and torch.equal(v_cache[b, :, n:n + n_new], v_new[b])
        assert torch.equal(k_cache[b, :, :n], kc0[b, :, :n]) and torch.equal(k_cache[b, :, n + n_new:], kc0[b, :, n + n_new:])
        kf, vf = k_cache[b:b + 1, :, :n + n_new], v_cache[b:b + 1, :, :n + n_new]
        expect = ref.sigmoid_attention(q[b:b + 1].double(), kf.double(), vf.double(), causal=True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[b:b + 1].double(), expect, rtol=tol, atol=tol)
    # the dense op with seqused_k semantics agrees with the reference's seqused_k mode
    expect = ref.sigmoid_attention(q.double(), k_cache.double(), v_cache.double(), causal=True,
                                   seqused_k=cache_lens + n_new)
    torch.testing.assert_close(out.double(), expect, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_kvcache_without_new_tokens_and_errors():
    k_cache = torch.randn(2, 1, 16, 8)
    v_cache = torch.randn(2, 1, 16, 8)
    q = torch.randn(2, 2, 1, 8)
    lens = torch.tensor([16, 5], dtype=torch.int32)
    out = sigmoid_attention_kvcache(q, k_cache, v_cache, lens)
    expect = ref.sigmoid_attention(q, k_cache, v_cache, causal=True, seqused_k=lens)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"cache is too small: cache_seqlens\[0\] = 16 plus 1 new tokens"):
        sigmoid_attention_kvcache(q, k_cache, v_cache, lens, torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8))
    with pytest.raises(TypeError, match="int32"):
        sigmoid_attention_kvcache(q, k_cache, v_cache, lens.long())
    with pytest.raises(ValueError, match="together"):
        sigmoid_attention_kvcache(q, k_cache, v_cache, lens, torch.randn(2, 1, 1, 8))
    with pytest.raises(ValueError, match="seqused_k"):
        sigmoid_attention_kvcache(q, k_cache, v_cache, torch.tensor([17, 1], dtype=torch.int32))


def _append_reference(cache, new, lens):
    out = cache.clone()
    for b, n in enumerate(lens.tolist()):
        out[b, :, n:n + new.shape[2]] = new[b]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kv_cache_append_op_writes_each_row_at_its_length(dtype):
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = (torch.randn(3, 2, 12, 8, generator=g).to(dtype) for _ in range(2))
    # the new tokens in the (B, L, H, D) projection layout, seen as (B, H, L, D): strided rows
    k_new, v_new = (torch.randn(3, 4, 2, 8, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    lens = torch.tensor([0, 5, 8], dtype=torch.int32)
    want_k, want_v = _append_reference(k_cache, k_new, lens), _append_reference(v_cache, v_new, lens)
    assert torch.ops.accel.kv_cache_append(k_cache, v_cache, k_new, v_new, lens) is None
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert lens.tolist() == [0, 5, 8]  # the lengths are the caller's to advance
    # a strided head dim (every other element of a wider tensor) is copied element by element
    k_wide = torch.randn(3, 2, 1, 16, generator=g).to(dtype)
    torch.ops.accel.kv_cache_append(k_cache, v_cache, k_wide[..., ::2], k_wide[..., 1::2], lens)
    assert torch.equal(k_cache[1, :, 5], k_wide[1, :, 0, ::2]) and torch.equal(v_cache[2, :, 8], k_wide[2, :, 0, 1::2])


def test_kv_cache_append_errors_name_the_argument():
    kc, vc = torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4)
    new = torch.ones(2, 2, 3, 4)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    append = torch.ops.accel.kv_cache_append
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 6 plus 3 new tokens must lie in \[0, 8\]"):
        append(kc, vc, new, new, torch.tensor([0, 6], dtype=torch.int32))
    assert not kc.any() and not vc.any()  # checked before anything is written
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = -1"):
        append(kc, vc, new, new, torch.tensor([-1, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_seqlens must be int32, got Long"):
        append(kc, vc, new, new, lens.long())
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(B,\) = \(2,\), got \[3\]"):
        append(kc, vc, new, new, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k_new must have shape \(B, H_kv, L_new, D\) = \(2, 2, L_new, 4\)"):
        append(kc, vc, torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4), lens)
    with pytest.raises(ValueError, match="v_new must have k_new's shape"):
        append(kc, vc, new, new[:, :, :2], lens)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        append(kc, vc[:, :, :4], new, new, lens)
    with pytest.raises(TypeError, match="v_new has dtype Double but k_cache has dtype Float"):
        append(kc, vc, new, new.double(), lens)
    with pytest.raises(ValueError, match="cannot append 9 tokens"):
        append(kc, vc, torch.ones(2, 2, 9, 4), torch.ones(2, 2, 9, 4), lens)
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        append(kc[0], vc, new, new, lens)


def test_kv_cache_append_opcheck():
    g = torch.Generator().manual_seed(4)
    kc, vc = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(2))
    kn, vn = (torch.randn(2, 3, 2, 8, generator=g) for _ in range(2))
    for lens in ([0, 8], [3, 1]):
        torch.library.opcheck(torch.ops.accel.kv_cache_append,
                              (kc.clone(), vc.clone(), kn, vn, torch.tensor(lens, dtype=torch.int32)))


def test_kvcache_decode_step_compiles_fullgraph():
    """A compiled decode step (append + attention) gives eager's output and leaves the same caches."""
    g = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(2))
    lens = torch.tensor([3, 9], dtype=torch.int32)

    def step(q, k_cache, v_cache, k_new, v_new, lens):
        return sigmoid_attention_kvcache(q, k_cache, v_cache, lens, k_new, v_new) * 2

    compiled = torch.compile(step, fullgraph=True)
    caches = {"eager": (kc.clone(), vc.clone()), "compiled": (kc.clone(), vc.clone())}
    for _ in range(3):
        q = torch.randn(2, 4, 2, 8, generator=g)
        kn, vn = (torch.randn(2, 2, 2, 8, generator=g) for _ in range(2))
        want = step(q, *caches["eager"], kn, vn, lens)
        got = compiled(q, *caches["compiled"], kn, vn, lens)
        torch.testing.assert_close(got, want)
        assert all(torch.equal(a, b) for a, b in zip(caches["compiled"], caches["eager"]))
        lens += 2
    assert not torch.equal(caches["eager"][0], kc)  # the step did write the caches


# ---------------------------------------------------------------- errors

def test_bad_inputs_get_clear_errors():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        sigmoid_attention(q, k, k)
    with pytest.raises(ValueError, match="same head dim"):
        sigmoid_attention(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(TypeError, match="k has dtype Double but q has dtype Float"):
        sigmoid_attention(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16).double(), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H_q, L_q, D\), got shape \[2, 8, 16\]"):
        sigmoid_attention(torch.randn(2, 8, 16), k, k)
    with pytest.raises(ValueError, match=r"bias must have shape \(H_q,\)"):
        sigmoid_attention(k, k, k, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        sigmoid_attention(k, k, k, alibi_slopes=torch.zeros(5))
    with pytest.raises(ValueError, match=r"window sizes must be >= 0, or -1 for unbounded, got \(-2, 0\)"):
        sigmoid_attention(k, k, k, window=(-2, 0))
    with pytest.raises(ValueError, match="causal=True cannot be combined with a right window of 2"):
        sigmoid_attention(k, k, k, causal=True, window=(3, 2))
    with pytest.raises(ValueError, match="last"):
        sigmoid_attention(torch.randn(1, 2, 16, 8).transpose(2, 3), k, k)
    with pytest.raises(TypeError, match="floating-point"):
        sigmoid_attention(k.long(), k.long(), k.long())
    with pytest.raises(TypeError, match="q must be a tensor, got list"):
        sigmoid_attention([1.0], k, k)
    with pytest.raises(TypeError, match="bias must be None, a float or a per-head"):
        sigmoid_attention(k, k, k, bias="big")
    with pytest.raises(ValueError, match=r"window must be a pair \(left, right\) of ints"):
        sigmoid_attention(k, k, k, window=(1,))


def test_bad_varlen_inputs_get_clear_errors():
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        sigmoid_attention_varlen(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32),
                                 torch.tensor([0, 6, 4, 10], dtype=torch.int32), 10, 10)
    with pytest.raises(ValueError, match="beyond"):
        sigmoid_attention_varlen(q, q, q, torch.tensor([0, 4, 11], dtype=torch.int32), cu, 10, 10)
    with pytest.raises(ValueError, match="maximum"):
        sigmoid_attention_varlen(q, q, q, cu, cu, 4, 10)
    with pytest.raises(ValueError, match=r"\[0\] must be 0"):
        sigmoid_attention_varlen(q, q, q, torch.tensor([1, 4, 10], dtype=torch.int32), cu, 10, 10)
    with pytest.raises(ValueError, match="same length"):
        sigmoid_attention_varlen(q, q, q, cu, torch.tensor([0, 10], dtype=torch.int32), 10, 10)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        sigmoid_attention_varlen(q, q, q, cu.long(), cu, 10, 10)


# ---------------------------------------------------------------- torch integration

def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v, _ = _inputs(2, 4, 2, 37, 41, 16, torch.float32)
    slopes = _slopes(4).float()

    def f(q, k, v):
        return sigmoid_attention(q, k, v, causal=True, alibi_slopes=slopes, bias=-2.0).square().sum()

    cf = torch.compile(f, fullgraph=True)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    args2 = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.testing.assert_close(cf(*args), f(*args2))
    cf(*args).backward()
    f(*args2).backward()
    for a, b in zip(args, args2):
        torch.testing.assert_close(a.grad, b.grad)


def test_opcheck():
    q, k, v, bias = _inputs(2, 4, 2, 19, 23, 16, torch.float32)
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    cuk = torch.tensor([0, 11, 23], dtype=torch.int32)
    samples = [
        (q, k, v, None, None, None, 19, 23, 0.25, None, None, False, -1, -1, None),
        (q, k, v, None, None, None, 19, 23, 0.25, bias.float(), None, True, 4, 0, _slopes(4).float()),
        (q, k, v, None, None, torch.tensor([20, 3], dtype=torch.int32), 19, 23, 0.25, None, -1.0, True, -1, 0, None),
        (q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous(),
         cu, cuk, None, 12, 12, 0.25, None, None, True, -1, 0, None),
    ]
    for s in samples:
        s = list(s)
        for i in range(3):
            s[i] = s[i].clone().requires_grad_()
        torch.library.opcheck(torch.ops.accel.sigmoid_attention_fwd, tuple(s))


def test_avx2_path_matches(tmp_path):
    """The AVX2 sigmoid (the wheel's baseline) gives the same results as the run-time AVX-512 one."""
    script = tmp_path / "run.py"
    script.write_text(
        "import torch, sys\n"
        "from accel.ops import sigmoid_attention\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(2, 2, 77, 40, generator=g) for _ in range(3))\n"
        "torch.save(sigmoid_attention(q, k, v, causal=True, alibi_slopes=torch.tensor([0.5, 0.25])), sys.argv[1])\n"
    )
    outs = []
    for isa in ("avx2", "native"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, ACCEL_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(sys.path))
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env)
        outs.append(torch.load(path))
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-6, atol=2e-6)


def test_info_lists_the_op():
    assert accel.info(print_it=False)["kernels"]["sigmoid_attention"]["cpu"] is True


def test_varlen_lengths_may_be_numpy_or_tensor_ints():
    np = pytest.importorskip("numpy")
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    want = sigmoid_attention_varlen(q, k, v, cu, cu, 4, 4)
    torch.testing.assert_close(sigmoid_attention_varlen(q, k, v, cu, cu, np.int64(4), torch.tensor(4)), want)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        sigmoid_attention_varlen(q, k, v, cu, cu, 4.0, 4)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        sigmoid_attention_varlen(q, k, v, cu, cu, 4, True)
