"""CUDA kernels of accel.ops.dilated_conv1d, checked against the CPU kernel and the pure-PyTorch
reference (fp64 oracle; for fp16/bf16, against what F.conv1d achieves in the same precision)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from accel.ops.dilated_conv1d import dilated_conv1d, resolve_padding  # noqa: E402
from accel.reference.dilated_conv1d import dilated_conv1d as reference  # noqa: E402

DEV = "cuda"
ACTS = [None, "relu", "gelu", "silu"]
KS = [1, 3, 4, 7, 9]
DILATIONS = [1, 2, 5, 64]
LENGTHS = [1, 5, 127, 1000, 4099]
# name -> (C_in, C_out, groups)
GROUPINGS = {"dense": (5, 3, 1), "depthwise": (8, 8, 8), "grouped": (6, 6, 2)}
PADDINGS = ["causal", "same", 3]
OP = torch.ops.accel.dilated_conv1d.default
OP_BACKWARD = torch.ops.accel.dilated_conv1d_backward.default


# ----------------------------------------------------------------------------- helpers

def make_inputs(batch, c_in, c_out, groups, k, length, out_length, *, bias=True, residual=True, seed=0,
                dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, length, generator=gen, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, k, generator=gen, dtype=torch.float64) / max(1, c_in // groups * k) ** 0.5
    b = torch.randn(c_out, generator=gen, dtype=torch.float64) if bias else None
    r = torch.randn(batch, c_out, out_length, generator=gen, dtype=torch.float64) if residual else None
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return conv(x), conv(w), conv(b), conv(r)


def to(tensors, device=None, dtype=None, requires_grad=False):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach().to(device=device or t.device, dtype=dtype or t.dtype).clone()
        out.append(t.requires_grad_(requires_grad))
    return out


def max_err(actual, expected):
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def scale_of(t):
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0


def assert_close(actual, expected, tol, what):
    assert actual is not None and expected is not None, f"{what}: missing tensor"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err, scale = max_err(actual, expected), scale_of(expected)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


def grads(out, inputs, grad_out):
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, live, grad_out, allow_unused=True))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def apply_act(y, act):
    if act == "relu":
        return F.relu(y)
    if act == "gelu":
        return F.gelu(y)
    if act == "silu":
        return F.silu(y)
    assert act in (None, "none")
    return y


def raw_reference(x, w, b, r, dilation, pad_left, out_length, groups, act):
    """The raw op's semantics for any pad_left (negative crops) and any out_length."""
    batch, c_in, length = x.shape
    span = (w.shape[-1] - 1) * dilation
    need = max(out_length, 1) + span
    xp = torch.cat([x.new_zeros(batch, c_in, pad_left), x], -1) if pad_left >= 0 else x[..., -pad_left:]
    if xp.shape[-1] < need:
        xp = torch.cat([xp, x.new_zeros(batch, c_in, need - xp.shape[-1])], -1)
    y = F.conv1d(xp[..., :need], w, b, dilation=dilation, groups=groups)[..., :out_length]
    y = apply_act(y, act)
    return y if r is None else y + r


def case_name(**kw):
    return ", ".join(f"{k}={v}" for k, v in kw.items())


# ----------------------------------------------------------------------------- forward grid

@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("k", KS)
def test_forward_grid(k, dilation):
    i = 0
    for gname, (c_in, c_out, groups) in GROUPINGS.items():
        for padding in PADDINGS:
            for length in LENGTHS:
                try:
                    _, out_length = resolve_padding(padding, k, dilation, length)
                except ValueError:
                    continue  # int padding shorter than the receptive field: no output
                act, use_res, use_bias = ACTS[i % 4], (i // 4) % 2 == 0, i % 3 != 2
                i += 1
                what = case_name(group=gname, K=k, d=dilation, padding=padding, L=length, act=act, res=use_res,
                                 bias=use_bias)
                x, w, b, r = make_inputs(2, c_in, c_out, groups, k, length, out_length, bias=use_bias,
                                         residual=use_res, seed=i)
                kw = dict(dilation=dilation, padding=padding, groups=groups, activation=act)
                expected = reference(x, w, b, residual=r, **kw)
                for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
                    xc, wc, bc, rc = to((x, w, b, r), DEV, dtype)
                    out = dilated_conv1d(xc, wc, bc, residual=rc, **kw)
                    assert out.dtype == dtype and out.device.type == "cuda" and out.is_contiguous()
                    assert_close(out, expected, tol, f"cuda {dtype} vs reference [{what}]")
                    xh, wh, bh, rh = to((x, w, b, r), "cpu", dtype)
                    out_cpu = dilated_conv1d(xh, wh, bh, residual=rh, **kw)
                    assert_close(out, out_cpu, tol, f"cuda vs cpu {dtype} [{what}]")
    assert i > 0


@pytest.mark.parametrize("gname", list(GROUPINGS))
def test_raw_op_any_padding(gname):
    """pad_left < 0 crops; out_length may exceed what the input covers (zeros past the end)."""
    c_in, c_out, groups = GROUPINGS[gname]
    k, dilation, length = 3, 3, 17
    for n, (pad_left, out_length) in enumerate(
            [(p, o) for p in (-40, -7, -1, 0, 2, 20, 60) for o in (0, 1, 13, 40)]):
        act = ACTS[n % 4]
        x, w, b, r = make_inputs(2, c_in, c_out, groups, k, length, out_length, residual=n % 2 == 0, seed=n)
        args = (dilation, pad_left, out_length, groups, act or "none")
        what = case_name(group=gname, pad_left=pad_left, out_length=out_length, act=act)
        x64, w64, b64, r64 = to((x, w, b, r), requires_grad=True)
        expected = raw_reference(x64, w64, b64, r64, dilation, pad_left, out_length, groups, act)
        g = torch.randn(expected.shape, dtype=torch.float64)
        expected_grads = grads(expected, (x64, w64, b64, r64), g)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
            for device in (DEV, "cpu"):
                xc, wc, bc, rc = to((x, w, b, r), device, dtype, requires_grad=True)
                out = OP(xc, wc, bc, rc, *args)
                assert_close(out, expected, tol, f"{device} {dtype} forward [{what}]")
                got = grads(out, (xc, wc, bc, rc), g.to(device, dtype))
                for name, a, e in zip("xwbr", got, expected_grads):
                    if e is not None:
                        assert_close(a, e, tol * 10, f"{device} {dtype} grad_{name} [{what}]")


def test_empty_input_length():
    """L = 0 with a positive out_length: every tap is padding, the output is act(bias) (+ residual)."""
    x, w, b, r = make_inputs(2, 4, 4, 4, 3, 0, 5, seed=1)
    for act in ACTS:
        expected = raw_reference(x, w, b, r, 2, 4, 5, 4, act)
        out = OP(*to((x, w, b, r), DEV), 2, 4, 5, 4, act or "none")
        assert_close(out, expected, 1e-12, f"L=0 act={act}")


# ----------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("gname", list(GROUPINGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_low_precision(dtype, gname):
    """Error vs the fp64 reference within 2x (plus a little) of F.conv1d's own error in that dtype."""
    c_in, c_out, groups = GROUPINGS[gname]
    eps = torch.finfo(dtype).eps
    i = 0
    for k in (3, 7):
        for dilation in (1, 5):
            for padding in ("causal", "same"):
                for length in (127, 1000):
                    for act in ACTS:
                        i += 1
                        kw = dict(dilation=dilation, padding=padding, groups=groups, activation=act)
                        _, out_length = resolve_padding(padding, k, dilation, length)
                        inputs = make_inputs(2, c_in, c_out, groups, k, length, out_length, residual=i % 2 == 0,
                                             seed=i, dtype=dtype, device=DEV)
                        x, w, b, r = inputs
                        exact = reference(*to((x, w, b), dtype=torch.float64), residual=None if r is None else r.double(),
                                          **kw)
                        ours = dilated_conv1d(x, w, b, residual=r, **kw)
                        peer = reference(x, w, b, residual=r, **kw)
                        assert ours.dtype == dtype
                        err, err_peer = max_err(ours, exact), max_err(peer, exact)
                        bound = 2 * err_peer + 2 * eps * scale_of(exact)
                        what = case_name(dtype=dtype, group=gname, K=k, d=dilation, padding=padding, L=length, act=act)
                        assert err <= bound, f"{what}: error {err:.3g} > 2 x F.conv1d's {err_peer:.3g} + atol"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradients_low_precision(dtype):
    eps = torch.finfo(dtype).eps
    i = 0
    for gname, (c_in, c_out, groups) in GROUPINGS.items():
        for k, dilation in ((3, 1), (7, 5)):
            for act in ACTS:
                i += 1
                length = 1000
                kw = dict(dilation=dilation, padding="same", groups=groups, activation=act)
                inputs = make_inputs(2, c_in, c_out, groups, k, length, length, seed=i, dtype=dtype, device=DEV)
                g = torch.randn(2, c_out, length, device=DEV, dtype=dtype)
                exact_in = to(inputs, dtype=torch.float64, requires_grad=True)
                exact = grads(reference(*exact_in[:3], residual=exact_in[3], **kw), exact_in, g.double())
                ours_in = to(inputs, requires_grad=True)
                ours = grads(dilated_conv1d(*ours_in[:3], residual=ours_in[3], **kw), ours_in, g)
                peer_in = to(inputs, requires_grad=True)
                peer = grads(reference(*peer_in[:3], residual=peer_in[3], **kw), peer_in, g)
                for name, a, p, e in zip("xwbr", ours, peer, exact):
                    assert a.dtype == dtype
                    err, err_peer = max_err(a, e), max_err(p, e)
                    bound = 2 * err_peer + 2 * eps * scale_of(e)
                    what = case_name(dtype=dtype, group=gname, K=k, d=dilation, act=act)
                    assert err <= bound, f"grad_{name} [{what}]: error {err:.3g} > 2 x F.conv1d's {err_peer:.3g} + atol"


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("k", [1, 3, 4, 9])
@pytest.mark.parametrize("gname", list(GROUPINGS))
def test_gradients(gname, k):
    c_in, c_out, groups = GROUPINGS[gname]
    i = 0
    for dilation in (1, 5, 64):
        for padding in PADDINGS:
            for length in (5, 127, 1000):
                try:
                    _, out_length = resolve_padding(padding, k, dilation, length)
                except ValueError:
                    continue
                act, use_res, use_bias = ACTS[i % 4], (i // 4) % 2 == 1, i % 3 != 1
                i += 1
                what = case_name(group=gname, K=k, d=dilation, padding=padding, L=length, act=act, res=use_res,
                                 bias=use_bias)
                kw = dict(dilation=dilation, padding=padding, groups=groups, activation=act)
                inputs = make_inputs(2, c_in, c_out, groups, k, length, out_length, bias=use_bias, residual=use_res,
                                     seed=100 + i)
                g = torch.randn(2, c_out, out_length, dtype=torch.float64)
                ref_in = to(inputs, requires_grad=True)
                expected = grads(reference(*ref_in[:3], residual=ref_in[3], **kw), ref_in, g)
                for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
                    per_device = {}
                    for device in (DEV, "cpu"):
                        xin = to(inputs, device, dtype, requires_grad=True)
                        out = dilated_conv1d(*xin[:3], residual=xin[3], **kw)
                        per_device[device] = grads(out, xin, g.to(device, dtype))
                    for n, name in enumerate("xwbr"):
                        e, a, c = expected[n], per_device[DEV][n], per_device["cpu"][n]
                        if e is None:
                            continue
                        assert a.dtype == dtype and a.device.type == "cuda"
                        assert_close(a, e, tol, f"cuda {dtype} grad_{name} vs reference [{what}]")
                        assert_close(a, c, tol, f"cuda vs cpu {dtype} grad_{name} [{what}]")
    assert i > 0


@pytest.mark.parametrize("gname", list(GROUPINGS))
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(act, gname):
    c_in, c_out, groups = GROUPINGS[gname]
    for padding in ("causal", 2):
        _, out_length = resolve_padding(padding, 3, 2, 9)
        inputs = to(make_inputs(2, c_in, c_out, groups, 3, 9, out_length, seed=7, device=DEV), requires_grad=True)

        def fn(x, w, b, r):
            return dilated_conv1d(x, w, b, dilation=2, padding=padding, groups=groups, activation=act, residual=r)

        assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_output_mask():
    """Only the requested gradients are computed; the others (and grad_bias without bias) are empty."""
    x, w, b, _ = make_inputs(2, 6, 6, 2, 3, 50, 50, residual=False, seed=3, dtype=torch.float32, device=DEV)
    g = torch.randn(2, 6, 50, device=DEV)
    full = OP_BACKWARD(g, x, w, b, 2, 4, 2, "silu", [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = OP_BACKWARD(g, x, w, b, 2, 4, 2, "silu", mask)
        for want, a, f in zip(mask, got, full):
            if want:
                assert_close(a, f, 1e-6, f"mask={mask}")
            else:
                assert a.numel() == 0
    _, _, gb = OP_BACKWARD(g, x, w, None, 2, 4, 2, "silu", [True, True, True])
    assert gb.numel() == 0


# ----------------------------------------------------------------------------- dispatcher integration

def test_opcheck():
    cases = [
        ((2, 8, 8, 8, 3, 33), dict(dilation=2, pad_left=4, groups=8, act="gelu", bias=True, res=True)),
        ((2, 6, 6, 2, 4, 20), dict(dilation=1, pad_left=1, groups=2, act="none", bias=False, res=False)),
        ((1, 5, 3, 1, 1, 7), dict(dilation=3, pad_left=-2, groups=1, act="relu", bias=True, res=False)),
    ]
    for (batch, c_in, c_out, groups, k, length), o in cases:
        out_length = length + o["pad_left"] - (k - 1) * o["dilation"] + 3
        x, w, b, r = to(make_inputs(batch, c_in, c_out, groups, k, length, out_length, bias=o["bias"],
                                    residual=o["res"], seed=5, dtype=torch.float32, device=DEV), requires_grad=True)
        args = (x, w, b, r, o["dilation"], o["pad_left"], out_length, groups, o["act"])
        torch.library.opcheck(OP, args)
        g = torch.randn(batch, c_out, out_length, device=DEV)
        for mask in ([True, True, True], [False, True, False]):
            bargs = (g, x.detach(), w.detach(), None if b is None else b.detach(), o["dilation"], o["pad_left"],
                     groups, o["act"], mask)
            torch.library.opcheck(OP_BACKWARD, bargs)


def test_torch_compile_fullgraph():
    x, w, b, r = to(make_inputs(2, 16, 16, 16, 5, 300, 300, seed=9, dtype=torch.float32, device=DEV),
                    requires_grad=True)

    def f(x, w, b, r):
        y = dilated_conv1d(x, w, b, dilation=4, padding="causal", groups=16, activation="gelu", residual=r)
        return (y * y).sum()

    compiled = torch.compile(f, fullgraph=True)
    eager_loss = f(x, w, b, r)
    eager_grads = torch.autograd.grad(eager_loss, (x, w, b, r))
    loss = compiled(x, w, b, r)
    got = torch.autograd.grad(loss, (x, w, b, r))
    assert_close(loss, eager_loss, 1e-5, "compiled loss")
    for name, a, e in zip("xwbr", got, eager_grads):
        assert_close(a, e, 1e-5, f"compiled grad_{name}")


def test_current_stream():
    x, w, b, r = make_inputs(3, 8, 8, 8, 3, 5000, 5000, seed=11, dtype=torch.float32, device=DEV)
    # fp64: an fp32 F.conv1d on CUDA may run in TF32
    expected = reference(*to((x, w, b), dtype=torch.float64), dilation=2, padding="causal", groups=8,
                         activation="relu", residual=r.double())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = dilated_conv1d(x, w, b, dilation=2, padding="causal", groups=8, activation="relu", residual=r)
    stream.synchronize()
    assert_close(out, expected, 1e-5, "on a side stream")


# ----------------------------------------------------------------------------- layouts and sizes

def test_non_contiguous_inputs():
    batch, c, length, k, d = 2, 6, 40, 3, 2
    gen = torch.Generator().manual_seed(4)
    bases = dict(
        x=torch.randn(batch, length, c, generator=gen, dtype=torch.float64),  # transposed: dense, not contiguous
        x2=torch.randn(batch, c, 2 * length, generator=gen, dtype=torch.float64),  # strided slice: not dense
        w=torch.randn(k, 1, c, generator=gen, dtype=torch.float64),
        b=torch.randn(2 * c, generator=gen, dtype=torch.float64),
        r=torch.randn(batch, length, c, generator=gen, dtype=torch.float64),
    )
    views = dict(
        x=lambda t: t["x"].transpose(1, 2), x2=lambda t: t["x2"][..., ::2], w=lambda t: t["w"].permute(2, 1, 0),
        b=lambda t: t["b"][::2], r=lambda t: t["r"].transpose(1, 2),
    )
    kw = dict(dilation=d, padding="same", groups=c, activation="silu")
    for xname in ("x", "x2"):
        ref_bases = {n: t.clone().requires_grad_(True) for n, t in bases.items()}
        v = {n: f(ref_bases) for n, f in views.items()}
        expected = reference(v[xname], v["w"], v["b"], residual=v["r"], **kw)
        g = torch.randn(expected.shape, dtype=torch.float64)
        expected_grads = torch.autograd.grad(expected, [ref_bases[n] for n in (xname, "w", "b", "r")], g)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            our_bases = {n: t.to(DEV, dtype).requires_grad_(True) for n, t in bases.items()}
            v = {n: f(our_bases) for n, f in views.items()}
            assert not v[xname].is_contiguous() and not v["w"].is_contiguous()
            out = dilated_conv1d(v[xname], v["w"], v["b"], residual=v["r"], **kw)
            assert_close(out, expected, tol, f"{xname} {dtype} forward")
            got = torch.autograd.grad(out, [our_bases[n] for n in (xname, "w", "b", "r")], g.to(DEV, dtype))
            for name, a, e in zip((xname, "w", "b", "r"), got, expected_grads):
                assert_close(a, e, tol * 10, f"{xname} {dtype} grad_{name}")
    # The backward op's gradients are contiguous, as its fake function promises.
    x = bases["x"].to(DEV).transpose(1, 2)
    w = bases["w"].to(DEV).permute(2, 1, 0).contiguous()
    gx, gw, _ = OP_BACKWARD(torch.randn(batch, c, length, device=DEV, dtype=torch.float64), x, w, None, d, 2, c,
                            "none", [True, True, False])
    assert gx.is_contiguous() and gx.shape == x.shape and gw.shape == w.shape


def test_zero_sizes():
    # batch 0
    x, w, b, r = to(make_inputs(0, 4, 4, 4, 3, 10, 10, seed=1, dtype=torch.float32, device=DEV), requires_grad=True)
    out = dilated_conv1d(x, w, b, groups=4, activation="gelu", residual=r)
    assert out.shape == (0, 4, 10)
    gx, gw, gb, gr = torch.autograd.grad(out.sum(), (x, w, b, r))
    assert gx.shape == x.shape and gr.shape == r.shape
    assert gw.shape == w.shape and not gw.any() and gb.shape == b.shape and not gb.any()
    # no output channels
    x, w, b, _ = to(make_inputs(2, 4, 0, 1, 3, 10, 10, residual=False, seed=1, dtype=torch.float32, device=DEV),
                    requires_grad=True)
    out = dilated_conv1d(x, w, b)
    assert out.shape == (2, 0, 10)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape and not gx.any() and gw.shape == w.shape and gb.shape == b.shape
    # out_length 0 (raw op)
    x, w, b, _ = to(make_inputs(2, 4, 4, 4, 3, 10, 0, residual=False, seed=1, dtype=torch.float32, device=DEV),
                    requires_grad=True)
    out = OP(x, w, b, None, 1, 2, 0, 4, "relu")
    assert out.shape == (2, 4, 0)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert not gx.any() and not gw.any() and not gb.any()


def test_large_batch():
    """More (b, c) rows than a grid dimension allows (65535)."""
    batch, c, length = 70000, 2, 5
    x, w, b, r = make_inputs(batch, c, c, c, 3, length, length, seed=2, dtype=torch.float32, device=DEV)
    x64, w64, b64, r64 = to((x, w, b, r), dtype=torch.float64, requires_grad=True)
    kw = dict(dilation=2, padding="same", groups=c, activation="relu")
    expected = reference(x64, w64, b64, residual=r64, **kw)
    g = torch.randn(expected.shape, device=DEV, dtype=torch.float64)
    expected_grads = grads(expected, (x64, w64, b64, r64), g)
    ours_in = to((x, w, b, r), requires_grad=True)
    out = dilated_conv1d(*ours_in[:3], residual=ours_in[3], **kw)
    assert_close(out, expected, 1e-5, "large batch forward")
    for name, a, e in zip("xwbr", grads(out, ours_in, g.float()), expected_grads):
        assert_close(a, e, 1e-4, f"large batch grad_{name}")


@pytest.mark.parametrize(
    "c_in, c_out, groups, k, dilation, length",
    [
        (4, 4, 4, 9, 64, 131075),  # TCN-like long sequence, staged input window
        (3, 3, 3, 3, 300, 200),  # dilation wider than the tile: direct global reads
        (2, 2, 2, 17, 1000, 2000),  # window too big for shared memory: direct global reads
        (512, 2, 1, 9, 1, 50),  # weights too big for shared memory; many grad_weight tap passes
        (4, 4, 4, 1, 1 << 40, 33),  # K = 1 ignores a huge dilation
    ],
)
def test_kernel_paths(c_in, c_out, groups, k, dilation, length):
    inputs = make_inputs(1, c_in, c_out, groups, k, length, length, seed=13, dtype=torch.float32, device=DEV)
    kw = dict(dilation=dilation, padding="causal", groups=groups, activation="silu")
    ref_in = to(inputs, dtype=torch.float64, requires_grad=True)
    # a single tap is the same convolution at any dilation; cuDNN would reject 2^40
    expected = reference(*ref_in[:3], residual=ref_in[3], **dict(kw, dilation=dilation if k > 1 else 1))
    g = torch.randn(expected.shape, device=DEV, dtype=torch.float64)
    expected_grads = grads(expected, ref_in, g)
    ours_in = to(inputs, requires_grad=True)
    out = dilated_conv1d(*ours_in[:3], residual=ours_in[3], **kw)
    assert_close(out, expected, 2e-5, "forward")
    for name, a, e in zip("xwbr", grads(out, ours_in, g.float()), expected_grads):
        assert_close(a, e, 1e-4, f"grad_{name}")


# ----------------------------------------------------------------------------- bad inputs

def test_device_mismatch():
    x = torch.randn(2, 4, 10, device=DEV)
    w = torch.randn(4, 1, 3)
    with pytest.raises(ValueError, match="same device"):
        OP(x, w, None, None, 1, 2, 10, 4, "none")
    with pytest.raises(ValueError, match="same device"):
        OP(x, w.to(DEV), torch.randn(4), None, 1, 2, 10, 4, "none")
    with pytest.raises(ValueError, match="same device"):
        OP_BACKWARD(torch.randn(2, 4, 10), x, w.to(DEV), None, 1, 2, 4, "none", [True, True, False])


def test_bad_inputs_cuda():
    x = torch.randn(2, 4, 10, device=DEV)
    w = torch.randn(4, 1, 3, device=DEV)
    with pytest.raises(TypeError, match="dtype"):
        OP(x, w.double(), None, None, 1, 2, 10, 4, "none")
    with pytest.raises(ValueError, match="activation"):
        OP(x, w, None, None, 1, 2, 10, 4, "tanh")
    with pytest.raises(ValueError, match="groups"):
        OP(x, w, None, None, 1, 2, 10, 3, "none")
    with pytest.raises(ValueError, match="residual"):
        OP(x, w, None, torch.randn(2, 4, 9, device=DEV), 1, 2, 10, 4, "none")
    with pytest.raises(ValueError, match="grad_out"):
        OP_BACKWARD(torch.randn(2, 3, 10, device=DEV), x, w, None, 1, 2, 4, "none", [True, True, False])
