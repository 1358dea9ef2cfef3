"""CUDA kernels of accel.ops.fused_moe: moe_route (+ backward) and the fused expert block (+ backward).

Oracle: accel.reference.fused_moe in float64 on the GPU, on the same (rounded) inputs and with the
kernel's expert ids, so the errors measure the computation only. fp16/bf16 results must be within
twice the error of the reference run in that same low precision (plus a tiny floor); float32 within
1e-5 of the truth's scale (its max-abs, at least 1).
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
from accel.ops.fused_moe import fused_moe, moe_route  # noqa: E402
from accel.reference.fused_moe import fused_moe as ref_fused_moe  # noqa: E402
from accel.reference.fused_moe import moe_route as ref_moe_route  # noqa: E402

if torch.cuda.is_available() and not _ext.build_info().get("cuda", False):
    pytestmark.append(pytest.mark.skip(reason="accel was built without CUDA kernels"))

DEV = "cuda"
LOW = [torch.float16, torch.bfloat16]
ALL = LOW + [torch.float32]
DT_IDS = ["fp16", "bf16", "fp32"]
NAMES = ["out", "d_hidden", "d_gate_up_proj", "d_down_proj", "d_topk_weights", "d_router_logits"]


# ----------------------------------------------------------------------------- helpers

def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if b.numel() else 0.0


def scale_of(t):
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def check_close(got, truth, rtol, what, names=NAMES):
    for name, g, t in zip(names, got, truth):
        assert g.shape == t.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite values"
        err = max_err(g, t)
        assert err <= rtol * scale_of(t), f"{what} {name}: max abs error {err:.3g} > {rtol:g} * {scale_of(t):.3g}"


def check_low_precision(got, eager, truth, dtype, what):
    floor = 0.25 * torch.finfo(dtype).eps
    for name, g, e, t in zip(NAMES, got, eager, truth):
        assert g.shape == t.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite values"
        err, ref_err = max_err(g, t), max_err(e, t)
        tol = 2 * ref_err + floor * scale_of(t)
        assert err <= tol, f"{what} {name}: kernel error {err:.3g} > 2 x eager error {ref_err:.3g} + floor"


def make_problem(T, E, H, I, gen, special=None):
    """fp32 hidden, gate_up_proj, down_proj, router_logits, grad_out on the GPU."""
    x = torch.randn(T, H, generator=gen)
    w1 = torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)
    w2 = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
    logits = torch.randn(T, E, generator=gen) * 2
    if special == "one_expert":  # every token's first choice is the last expert
        logits[:, E - 1] += 20
    elif special == "empty_experts":  # the first half of the experts never get a token
        logits[:, : E // 2] -= 30
    dout = torch.randn(T, H, generator=gen)
    return [t.to(DEV) for t in (x, w1, w2, logits, dout)]


def route_from_ids(logits, ids, renormalize, scoring):
    """Differentiable weights of the given (kernel-chosen) experts, in the logits' dtype."""
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    w = scores.gather(1, ids)
    return w / w.sum(-1, keepdim=True) if renormalize else w


def run_accel(x, w1, w2, logits, dout, k, renorm, scoring, act):
    x, w1, w2, logits = (t.detach().requires_grad_() for t in (x, w1, w2, logits))
    w, ids = moe_route(logits, k, renormalize=renorm, scoring=scoring)
    out = fused_moe(x, w1, w2, topk_weights=w, topk_ids=ids, activation=act)
    grads = torch.autograd.grad(out, (x, w1, w2, w, logits), dout)
    return [out.detach(), *grads], ids, w.detach()


def run_reference(x, w1, w2, logits, dout, ids, renorm, scoring, act):
    x, w1, w2, logits = (t.detach().requires_grad_() for t in (x, w1, w2, logits))
    w = route_from_ids(logits, ids, renorm, scoring)
    out = ref_fused_moe(x, w1, w2, topk_weights=w, topk_ids=ids, activation=act)
    inputs = (x, w1, w2, w, logits)
    if not out.requires_grad:  # T = 0: the reference's output does not depend on anything
        return [out.detach(), *(torch.zeros_like(t) for t in inputs)]
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True, materialize_grads=True)
    return [out.detach(), *grads]


def check_routing(w, ids, logits, k, renorm, scoring, what):
    """Kernel routing vs accel.reference.moe_route: same ids except between (near-)tied scores."""
    ref_w, ref_ids = ref_moe_route(logits, k, renorm, scoring)
    wdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert ids.dtype == torch.int64 and w.dtype == wdtype, f"{what}: dtypes {w.dtype}, {ids.dtype}"
    assert ((ids >= 0) & (ids < logits.shape[1])).all(), f"{what}: ids out of range"
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} weights: {m}")
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    # a mismatch is allowed only where the two chosen scores are equal to ~1e-6
    s_got, s_ref = scores.gather(1, ids), scores.gather(1, ref_ids)
    bad = (ids != ref_ids) & ((s_got - s_ref).abs() > 1e-6 * s_ref.abs().clamp_min(1e-30))
    assert not bad.any(), f"{what}: ids differ from torch.topk's at {bad.nonzero()[:5].tolist()}"
    if k > 1 and ids.shape[0]:
        assert (w[:, :-1] >= w[:, 1:]).all(), f"{what}: weights not in descending order"


# ----------------------------------------------------------------------------- the expert block, grid

#        T,  E,  k,   H,   I, scoring, renorm, activation, special
CASES = [
    (0, 4, 2, 64, 32, "softmax", True, "silu", None),
    (1, 1, 1, 33, 65, "softmax", False, "silu", None),
    (1, 8, 2, 128, 96, "softmax", True, "silu", None),
    (3, 4, 4, 130, 33, "sigmoid", True, "gelu", None),
    (3, 13, 4, 65, 130, "sigmoid", False, "relu", None),
    (3, 4, 2, 1, 1, "softmax", True, "silu", None),
    (64, 8, 2, 256, 128, "softmax", True, "silu", None),
    (64, 13, 13, 33, 17, "softmax", False, "none", None),
    (64, 1, 1, 64, 128, "sigmoid", True, "silu", None),
    (257, 4, 1, 130, 65, "softmax", True, "silu", "one_expert"),
    (257, 13, 2, 96, 200, "softmax", True, "gelu", None),
    (257, 8, 8, 64, 64, "sigmoid", True, "silu", None),
    (257, 13, 4, 130, 66, "softmax", False, "relu", "empty_experts"),
    (257, 4, 4, 48, 40, "softmax", True, "none", None),
    (2048, 8, 2, 256, 384, "softmax", True, "silu", None),
    (2048, 13, 4, 130, 65, "sigmoid", True, "gelu", "empty_experts"),
    (2048, 4, 2, 64, 128, "softmax", False, "silu", "one_expert"),
]


def case_id(c):
    T, E, k, H, I, scoring, renorm, act, special = c
    return f"T{T}-E{E}-k{k}-H{H}-I{I}-{scoring}{'-renorm' if renorm else ''}-{act}{'-' + special if special else ''}"


@pytest.mark.parametrize("dtype", ALL, ids=DT_IDS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_fused_moe_grid(case, dtype):
    T, E, k, H, I, scoring, renorm, act, special = case
    gen = torch.Generator().manual_seed(T * 1009 + E * 31 + k * 7 + H + I)
    x, w1, w2, logits, dout = make_problem(T, E, H, I, gen, special)
    x, w1, w2, dout = (t.to(dtype) for t in (x, w1, w2, dout))  # logits stay float32
    what = f"{dtype} {case_id(case)}"
    got, ids, w = run_accel(x, w1, w2, logits, dout, k, renorm, scoring, act)
    check_routing(w, ids, logits, k, renorm, scoring, what)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype
    assert got[4].dtype == torch.float32 and got[5].dtype == torch.float32
    if special == "empty_experts":
        assert not (ids < E // 2).any()
    truth = run_reference(*(t.double() for t in (x, w1, w2, logits, dout)), ids, renorm, scoring, act)
    if dtype == torch.float32:
        check_close(got, truth, 1e-5, what)
    else:
        eager = run_reference(x, w1, w2, logits, dout, ids, renorm, scoring, act)
        check_low_precision(got, eager, truth, dtype, what)
    if T == 0:
        assert got[2].abs().max().item() == 0 and got[3].abs().max().item() == 0


# ----------------------------------------------------------------------------- routing alone

ROUTE_CASES = [(0, 4, 2), (1, 1, 1), (3, 4, 4), (64, 8, 2), (257, 13, 4), (257, 13, 13), (2048, 8, 2),
               (100, 160, 6), (33, 64, 64)]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "plain"])
@pytest.mark.parametrize("ldtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("T,E,k", ROUTE_CASES)
def test_route(T, E, k, ldtype, renorm, scoring):
    gen = torch.Generator().manual_seed(T + E * 13 + k)
    logits = (torch.randn(T, E, generator=gen) * 3).to(DEV, ldtype).requires_grad_()
    g = torch.randn(T, k, generator=gen).to(DEV)
    what = f"route {ldtype} T={T} E={E} k={k} {scoring} renorm={renorm}"
    w, ids = moe_route(logits, k, renormalize=renorm, scoring=scoring)
    check_routing(w.detach(), ids, logits.detach(), k, renorm, scoring, what)
    (dl,) = torch.autograd.grad(w, logits, g)
    assert dl.dtype == ldtype and dl.shape == logits.shape
    l64 = logits.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(route_from_ids(l64, ids, renorm, scoring), l64, g.double())
    tol = 1e-5 if ldtype in (torch.float32, torch.float64) else 2 * torch.finfo(ldtype).eps
    check_close([dl], [want], tol, what, names=["d_router_logits"])


def test_route_ties_pick_the_lower_expert():
    logits = torch.tensor([[0.0] * 6, [1.0, 3.0, 3.0, 2.0, 3.0, -1.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], device=DEV)
    for scoring in ("softmax", "sigmoid"):
        w, ids = moe_route(logits, 4, renormalize=True, scoring=scoring)
        assert ids.tolist() == [[0, 1, 2, 3], [1, 2, 4, 3], [0, 1, 2, 3]], scoring
        torch.testing.assert_close(w[0], torch.full((4,), 0.25, device=DEV))


# ----------------------------------------------------------------------------- layouts, dtypes, determinism

def test_weights_in_hidden_dtype_and_int32_ids():
    gen = torch.Generator().manual_seed(11)
    T, E, k, H, I = 129, 6, 3, 72, 56
    x, w1, w2, logits, dout = (t.to(torch.bfloat16) for t in make_problem(T, E, H, I, gen))
    w, ids = ref_moe_route(logits.float(), k)
    w = w.to(torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (x, w1, w2, w)]
    out = fused_moe(*leaves[:3], topk_weights=leaves[3], topk_ids=ids.to(torch.int32))
    got = [out.detach(), *torch.autograd.grad(out, leaves, dout)]
    assert got[4].dtype == torch.bfloat16
    t64 = [t.detach().double().requires_grad_() for t in (x, w1, w2, w)]
    o64 = ref_fused_moe(*t64[:3], topk_weights=t64[3], topk_ids=ids)
    truth = [o64.detach(), *torch.autograd.grad(o64, t64, dout.double())]
    le = [t.detach().requires_grad_() for t in (x, w1, w2, w)]
    oe = ref_fused_moe(*le[:3], topk_weights=le[3], topk_ids=ids)
    eager = [oe.detach(), *torch.autograd.grad(oe, le, dout)]
    check_low_precision(got, eager, truth, torch.bfloat16, "bf16 weights, int32 ids")


@pytest.mark.parametrize("dtype", ALL, ids=DT_IDS)
def test_noncontiguous_and_misaligned_inputs(dtype):
    # hidden: a transposed view; gate_up_proj: a slice along H; down_proj and hidden (second run)
    # start one element into their buffers (not 16-byte aligned): the scalar load paths must give
    # exactly what the aligned contiguous inputs give.
    gen = torch.Generator().manual_seed(12)
    T, E, k, H, I = 77, 5, 2, 64, 48
    x, w1, w2, logits, dout = (t.to(dtype) for t in make_problem(T, E, H, I, gen))
    logits = logits.float()
    w, ids = moe_route(logits, k)
    xt = x.t().contiguous().t()
    w1s = torch.cat([w1, torch.zeros(E, 2 * I, 3, device=DEV, dtype=dtype)], 2)[..., :H]
    w2m = torch.empty(E * H * I + 1, device=DEV, dtype=dtype)[1:].view(E, H, I).copy_(w2)
    xm = torch.empty(T * H + 1, device=DEV, dtype=dtype)[1:].view(T, H).copy_(x)

    def run(*args):
        leaves = [t.detach().requires_grad_() for t in args + (w,)]
        out = fused_moe(*leaves[:3], topk_weights=leaves[3], topk_ids=ids)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout)]

    want = run(x, w1, w2)
    for args in ((xt, w1s, w2m), (xm, w1, w2m)):
        got = run(*args)
        for name, g, e in zip(NAMES, got, want):
            assert torch.equal(g, e), f"{dtype} {name}: strided / misaligned inputs differ"


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(13)
    x, w1, w2, logits, dout = (t.to(torch.bfloat16) for t in make_problem(1000, 8, 96, 80, gen))
    w, ids = moe_route(logits.float(), 2)
    _, cache = torch.ops.accel.fused_moe_fwd(x, w1, w2, w, ids, "silu", True)
    a = torch.ops.accel.fused_moe_bwd(dout, x, w1, w2, w, ids, cache, "silu", [True] * 4)
    b = torch.ops.accel.fused_moe_bwd(dout, x, w1, w2, w, ids, cache, "silu", [True] * 4)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_output_mask():
    gen = torch.Generator().manual_seed(14)
    x, w1, w2, logits, dout = (t.to(torch.float16) for t in make_problem(40, 4, 32, 24, gen))
    w, ids = moe_route(logits.float(), 2)
    _, cache = torch.ops.accel.fused_moe_fwd(x, w1, w2, w, ids, "gelu", True)
    full = torch.ops.accel.fused_moe_bwd(dout, x, w1, w2, w, ids, cache, "gelu", [True] * 4)
    for i in range(4):
        mask = [j == i for j in range(4)]
        part = torch.ops.accel.fused_moe_bwd(dout, x, w1, w2, w, ids, cache, "gelu", mask)
        for j, (p, f) in enumerate(zip(part, full)):
            if j == i:
                assert torch.equal(p, f), f"mask {mask}: gradient {j} differs from the full run"
            else:
                assert p.shape == (0,) and p.dtype == f.dtype and p.device == f.device


@pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("accel::fused_moe_fwd", "CPU"),
                    reason="accel was built without the CPU fused MoE kernels")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(15)
    x, w1, w2, logits, dout = make_problem(65, 6, 40, 33, gen)
    cuda = run_accel(x, w1, w2, logits, dout, 2, True, "softmax", "silu")[0]
    cpu = run_accel(*(t.cpu() for t in (x, w1, w2, logits, dout)), 2, True, "softmax", "silu")[0]
    check_close([c.cpu() for c in cuda], cpu, 1e-5, "cuda vs cpu")


# ----------------------------------------------------------------------------- dropped (out-of-range) ids

def test_out_of_range_ids():
    gen = torch.Generator().manual_seed(16)
    T, E, k, H, I = 50, 4, 2, 40, 24
    x, w1, w2, logits, dout = make_problem(T, E, H, I, gen)
    w, ids = moe_route(logits, k)
    bad = ids.clone()
    bad[3, 0], bad[7, 1], bad[20, 0] = E, -1, 1 << 40
    with pytest.raises(ValueError, match="topk_ids must be in"):
        fused_moe(x, w1, w2, topk_weights=w, topk_ids=bad)
    # the op itself drops such pairs: no contribution, zero gradient
    keep = (bad >= 0) & (bad < E)
    out, cache = torch.ops.accel.fused_moe_fwd(x, w1, w2, w, bad, "silu", True)
    want = ref_fused_moe(x.double(), w1.double(), w2.double(), topk_weights=(w * keep).double(),
                         topk_ids=bad.clamp(0, E - 1))
    check_close([out], [want], 1e-5, "dropped pairs", names=["out"])
    grads = torch.ops.accel.fused_moe_bwd(dout, x, w1, w2, w, bad, cache, "silu", [True] * 4)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[3][~keep].abs().max().item() == 0
    for i32 in (True, False):  # also int32 ids, and the routing backward with bad ids
        ids_ = bad.to(torch.int32) if i32 else bad
        if i32:
            ids_[20, 0] = 1 << 30
        torch.ops.accel.fused_moe_fwd(x, w1, w2, w, ids_, "silu", False)
        torch.ops.accel.moe_route_backward(torch.ones_like(w), logits, w, ids_, True, "softmax")
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- CUDA graphs, torch.compile, opcheck

def test_cuda_graph_capture_forward():
    gen = torch.Generator().manual_seed(17)
    T, E, k, H, I = 64, 8, 2, 256, 128
    x, w1, w2, logits, _ = make_problem(T, E, H, I, gen)
    x, w1, w2 = (t.to(torch.bfloat16) for t in (x, w1, w2))

    def f():
        return fused_moe(x, w1, w2, router_logits=logits, top_k=k)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = f()
        for seed in (1, 2):
            g2 = torch.Generator().manual_seed(seed)
            x.copy_(torch.randn(T, H, generator=g2))
            logits.copy_(torch.randn(T, E, generator=g2) * 2)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, f()), f"graph replay {seed} differs from the eager call"


def test_cuda_graph_capture_decode():
    # one graph per decode batch size, routing given as static int32 ids / float32 weights buffers
    gen = torch.Generator().manual_seed(18)
    E, k, H, I = 8, 2, 128, 96
    _, w1, w2, _, _ = make_problem(1, E, H, I, gen)
    w1, w2 = w1.half(), w2.half()
    for T in range(1, 9):
        x = torch.randn(T, H, device=DEV, dtype=torch.float16)
        w, ids = moe_route(torch.randn(T, E, device=DEV), k)
        ids = ids.to(torch.int32)
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fused_moe(x, w1, w2, topk_weights=w, topk_ids=ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fused_moe(x, w1, w2, topk_weights=w, topk_ids=ids)
            for _ in range(2):
                x.normal_()
                nw, nids = moe_route(torch.randn(T, E, device=DEV), k)
                w.copy_(nw)
                ids.copy_(nids)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, fused_moe(x, w1, w2, topk_weights=w, topk_ids=ids)), f"decode T={T}"


def test_cuda_graph_capture_backward_ops():
    gen = torch.Generator().manual_seed(19)
    T, E, k, H, I = 100, 6, 2, 72, 40
    x, w1, w2, logits, dout = (t.to(torch.bfloat16) for t in make_problem(T, E, H, I, gen))
    logits = logits.float()

    def step():
        w, ids = torch.ops.accel.moe_route(logits, k, True, "softmax")
        out, cache = torch.ops.accel.fused_moe_fwd(x, w1, w2, w, ids, "silu", True)
        grads = torch.ops.accel.fused_moe_bwd(dout, x, w1, w2, w, ids, cache, "silu", [True] * 4)
        dl = torch.ops.accel.moe_route_backward(grads[3], logits, w, ids, True, "softmax")
        return [out, *grads, dl]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (3, 4):
        g2 = torch.Generator().manual_seed(seed)
        for t in (x, logits, dout):
            t.copy_(torch.randn(t.shape, generator=g2))
        graph.replay()
        torch.cuda.synchronize()
        want = step()
        for i, (a, b) in enumerate(zip(outs, want)):
            assert torch.equal(a, b), f"graph replay {seed}: output {i} differs"


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(20)
    x, w1, w2, logits, dout = make_problem(48, 4, 64, 40, gen)
    x, w1, w2, dout = (t.to(torch.bfloat16) for t in (x, w1, w2, dout))

    def f(x, w1, w2, logits):
        return fused_moe(x, w1, w2, router_logits=logits, top_k=2, scoring="sigmoid") * 2

    def fwd_bwd(fn):
        leaves = [t.detach().requires_grad_() for t in (x, w1, w2, logits)]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout)]

    got = fwd_bwd(torch.compile(f, fullgraph=True))
    want = fwd_bwd(f)
    check_close(got, want, 1e-2, "compile", names=["out", "d_hidden", "d_gate_up_proj", "d_down_proj", "d_logits"])


def test_opcheck():
    gen = torch.Generator().manual_seed(21)
    T, E, k, H, I = 5, 4, 2, 40, 24
    x, w1, w2, logits, dout = (t.to(torch.float16) for t in make_problem(T, E, H, I, gen))
    logits = logits.float()
    w, ids = moe_route(logits, k)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    leaves = [t.detach().requires_grad_() for t in (x, w1, w2, w)]
    torch.library.opcheck(torch.ops.accel.fused_moe_fwd.default, (*leaves, ids, "silu", True), test_utils=utils)
    torch.library.opcheck(torch.ops.accel.moe_route.default, (logits.clone().requires_grad_(), k, True, "sigmoid"),
                          test_utils=utils)
    _, cache = torch.ops.accel.fused_moe_fwd(x, w1, w2, w, ids, "silu", True)
    no_autograd = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.accel.fused_moe_bwd.default,
                          (dout, x, w1, w2, w, ids, cache, "silu", [True, False, True, True]), test_utils=no_autograd)
    torch.library.opcheck(torch.ops.accel.moe_route_backward.default,
                          (torch.ones_like(w), logits, w, ids, False, "softmax"), test_utils=no_autograd)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(22)
    T, E, k, H, I = 6, 4, 2, 16, 8
    x, w1, w2, logits, _ = make_problem(T, E, H, I, gen)
    w, ids = moe_route(logits, k)
    with pytest.raises(RuntimeError, match="float64"):
        fused_moe(x.double(), w1.double(), w2.double(), topk_weights=w, topk_ids=ids)
    with pytest.raises(TypeError, match="dtype"):
        fused_moe(x.half(), w1.bfloat16(), w2.half(), topk_weights=w, topk_ids=ids)
    with pytest.raises(ValueError, match="device"):
        fused_moe(x, w1, w2.cpu(), topk_weights=w, topk_ids=ids)
    with pytest.raises(ValueError, match="gate_up_proj must have shape"):
        fused_moe(x, w1[:, :, :-1], w2, topk_weights=w, topk_ids=ids)
    with pytest.raises(TypeError, match="topk_ids"):
        fused_moe(x, w1, w2, topk_weights=w, topk_ids=ids.float())
    with pytest.raises(ValueError, match="cache"):
        torch.ops.accel.fused_moe_bwd(x, x, w1, w2, w, ids, x[:0], "silu", [True] * 4)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.accel.fused_moe_fwd(x, w1, w2, w, ids, "tanh", False)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        fused_moe(x, w1, w2, topk_weights=w, topk_ids=ids + E)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, E + 1)
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.accel.moe_route(logits, E + 1, True, "softmax")
    with pytest.raises(ValueError, match="scoring"):
        torch.ops.accel.moe_route(logits, k, True, "tanh")
    with pytest.raises(RuntimeError, match="topk_ids"):
        torch.ops.accel.moe_route_backward(w, logits, w, ids.float(), True, "softmax")
