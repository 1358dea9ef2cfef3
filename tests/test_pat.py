"""PAT_ch: partial_conv2d_stats, partial_conv2d's per-plane scale/shift, and accel.nn.PATChannel
against PATNet's eager formula (train and eval mode, forward, gradients, running statistics)."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accel.nn import PATChannel
from accel.ops import partial_conv2d, partial_conv2d_, partial_conv2d_stats
from pconv_cases import pconv_inputs, rel_error

ref = importlib.import_module("accel.reference.partial_conv2d")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # every input of this file the same on every run

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}
SIZES = [(1, 2), (2, 1), (3, 3), (7, 5), (13, 17), (28, 28), (56, 56)]


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (0.5 if "var" in name else 1.0)
                        + (0.5 if "var" in name or name.endswith("weight") and "bn" in name else 0.0))
    return model


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("H, W", SIZES)
def test_stats_match_reference(dtype, channels_last, H, W):
    x, _, _, _ = pconv_inputs(2, 40, 10, H, W, dtype, channels_last)
    x = (x * 3 + 5).requires_grad_()  # |mean| > std: the shifted sums must not cancel
    mean, std = partial_conv2d_stats(x)
    rm, rs = ref.partial_conv2d_stats(x.detach().double())
    assert mean.dtype == dtype and std.dtype == dtype and mean.shape == (2, 30)
    assert rel_error(mean, rm) < TOL[dtype]
    if H * W == 1:
        assert torch.isnan(std).all() and torch.isnan(rs).all()
        return
    assert rel_error(std, rs) < TOL[dtype] * 4
    gm, gs = torch.randn_like(rm), torch.randn_like(rs)
    (gx,) = torch.autograd.grad((mean * gm.to(dtype)).sum() + (std * gs.to(dtype)).sum(), x)
    xr = x.detach().double().requires_grad_()
    m2, s2 = ref.partial_conv2d_stats(xr)
    (gr,) = torch.autograd.grad((m2 * gm).sum() + (s2 * gs).sum(), xr)
    bound = TOL[dtype] * 4
    if dtype == torch.bfloat16:  # the saved bf16 mean rounds x - mean on tiny images: as eager bf16 does
        xe = x.detach().clone().requires_grad_()
        m3, s3 = ref.partial_conv2d_stats(xe)
        (ge,) = torch.autograd.grad((m3 * gm.to(dtype)).sum() + (s3 * gs.to(dtype)).sum(), xe)
        bound = max(bound, 2 * rel_error(ge, gr))
    assert gx.dtype == dtype and rel_error(gx, gr) < bound
    assert gx[:, :10].abs().max() == 0


@pytest.mark.parametrize("C", [16, 40, 64, 96, 130])
@pytest.mark.parametrize("n_div", [2, 4, 8])
def test_stats_grid(C, n_div):
    for cl in (False, True):
        x = pconv_inputs(3, C, C // n_div, 9, 11, torch.float32, cl)[0]
        for got, want in zip(partial_conv2d_stats(x, n_div=n_div), ref.partial_conv2d_stats(x.double(), n_div=n_div)):
            assert rel_error(got, want) < 1e-5


def test_stats_edges():
    x = torch.randn(0, 8, 5, 5)
    assert [t.shape for t in partial_conv2d_stats(x)] == [(0, 6), (0, 6)]
    x = torch.randn(2, 8, 6, 7)
    assert [t.shape for t in partial_conv2d_stats(x, dim_conv=8)] == [(2, 0), (2, 0)]
    mean, std = partial_conv2d_stats(torch.full((1, 4, 3, 3), 2.5), dim_conv=1)
    assert torch.equal(mean, torch.full((1, 3), 2.5)) and torch.equal(std, torch.zeros(1, 3))
    xt = torch.randn(2, 9, 8, 12).transpose(2, 3)  # neither layout: element by element
    for got, want in zip(partial_conv2d_stats(xt, dim_conv=4), ref.partial_conv2d_stats(xt.double(), dim_conv=4)):
        assert rel_error(got, want) < 1e-5
    x = torch.randn(2, 8, 1, 1, dtype=torch.float64)
    assert torch.isnan(partial_conv2d_stats(x)[1]).all()


def test_stats_bad_inputs():
    with pytest.raises(ValueError, match=r"partial_conv2d_stats: x must be 4-D"):
        partial_conv2d_stats(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match=r"partial_conv2d_stats: dim_conv .* must be in \[0, 8\]"):
        partial_conv2d_stats(torch.randn(2, 8, 5, 5), dim_conv=9)
    with pytest.raises(TypeError, match=r"partial_conv2d_stats: x must be a floating-point"):
        partial_conv2d_stats(torch.ones(2, 8, 5, 5, dtype=torch.int32))


# ---------------------------------------------------------------- per-plane scale and shift

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B, C, H, W, cp", [(2, 13, 7, 5, 3), (3, 40, 17, 23, 10), (2, 96, 14, 14, 24),
                                            (1, 320, 7, 7, 80), (2, 130, 28, 28, 16)])
@pytest.mark.parametrize("which", ["scale", "shift", "both"])
def test_scale_shift_forward_backward(dtype, channels_last, B, C, H, W, cp, which):
    x, w, b, gy = pconv_inputs(B, C, cp, H, W, dtype, channels_last)
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(B, C - cp, generator=gen, dtype=torch.float64).to(dtype) if which != "shift" else None
    t = torch.randn(B, C - cp, generator=gen, dtype=torch.float64).to(dtype) if which != "scale" else None
    leaves = [v.clone().requires_grad_() for v in (x, w, b, s, t) if v is not None]
    theirs = [v.detach().double().requires_grad_() for v in leaves]

    def call(fn, vals):
        it = iter(vals)
        xx, ww, bb = next(it), next(it), next(it)
        ss = next(it) if s is not None else None
        tt = next(it) if t is not None else None
        return fn(xx, ww, bb, dim_conv=cp, scale=ss, shift=tt)

    y = call(partial_conv2d, leaves)
    yr = call(ref.partial_conv2d, theirs)
    assert y.dtype == dtype and rel_error(y, yr) < TOL[dtype] * 4
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grads = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(yr, theirs, gy.double())
    for got, exp in zip(grads, want):
        assert got.dtype == dtype and rel_error(got, exp) < TOL[dtype] * 8


@pytest.mark.parametrize("channels_last", [False, True])
def test_scale_shift_in_place(channels_last):
    x, w, b, _ = pconv_inputs(2, 40, 10, 9, 8, torch.float32, channels_last)
    s, t = torch.randn(2, 30), torch.randn(2, 30)
    want = ref.partial_conv2d(x, w, b, scale=s, shift=t)
    y = x.clone()
    with torch.no_grad():
        out = partial_conv2d_(y, w, b, scale=s, shift=t)
    assert out is y and rel_error(y, want) < 1e-5
    with pytest.raises(ValueError, match="scale shares memory with x"):
        with torch.no_grad():
            partial_conv2d_(y, w, b, scale=y.as_strided((2, 30), (30, 1)))


def test_scale_shift_bad_inputs():
    x, w = torch.randn(2, 16, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"partial_conv2d: scale must have shape \(B, C - Cp\) = \(2, 12\)"):
        partial_conv2d(x, w, scale=torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"partial_conv2d: shift must be 2-D"):
        partial_conv2d(x, w, shift=torch.randn(12))
    with pytest.raises(TypeError, match=r"partial_conv2d: scale has dtype Double but x has dtype Float"):
        partial_conv2d(x, w, scale=torch.randn(2, 12, dtype=torch.float64))


# ---------------------------------------------------------------- the module against the eager formula

def _pair(dim, n_div, seed=0, dtype=torch.float64):
    eager = _randomise(ref.PATChannelFormula(dim, n_div), seed).to(dtype)
    mine = PATChannel(dim, n_div).to(dtype)
    mine.load_state_dict(eager.state_dict())
    return eager, mine


@pytest.mark.parametrize("dim, n_div, B, H, W", [(16, 4, 2, 7, 5), (40, 4, 3, 14, 14), (64, 2, 2, 9, 1),
                                                 (130, 8, 4, 6, 5), (96, 4, 2, 56, 56)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_matches_eager(dim, n_div, B, H, W, training, channels_last):
    eager, mine = _pair(dim, n_div)
    eager.train(training), mine.train(training)
    x = torch.randn(B, dim, H, W, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa), mine(xb)
    assert rel_error(yb, ya) < 1e-10
    gy = torch.randn_like(ya)
    pa = [xa] + list(eager.parameters())
    pb = [xb] + list(mine.parameters())
    # the gate's BatchNorm normalises B values: its gradient amplifies fp64 rounding (and the order
    # of the eager reductions, which varies with threads) by 1/std of B close values
    for got, want in zip(torch.autograd.grad(yb, pb, gy), torch.autograd.grad(ya, pa, gy)):
        assert rel_error(got, want) < 1e-7
    for (name, got), want in zip(mine.state_dict().items(), eager.state_dict().values()):
        assert torch.allclose(got.double(), want.double(), rtol=1e-10, atol=1e-12), name


def test_module_running_stats_momentum_none_and_fp32():
    eager, mine = _pair(40, 4, dtype=torch.float32)
    for m in (eager, mine):
        m.norm.momentum = None
        m.attn.bn.momentum = None
    x = torch.randn(4, 40, 12, 10, generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        ya, yb = eager(x), mine(x)
        assert rel_error(yb, ya) < 1e-4
    for (name, got), want in zip(mine.state_dict().items(), eager.state_dict().values()):
        assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6), name
    eager.eval(), mine.eval()
    with torch.no_grad():
        assert rel_error(mine(x), eager(x)) < 1e-5


def test_module_bf16_close_to_fp32():
    eager, mine = _pair(64, 4, dtype=torch.float32)
    eager.eval(), mine.eval()
    x = torch.randn(2, 64, 14, 14)
    with torch.no_grad():
        want = eager(x)
        got = copy.deepcopy(mine).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and rel_error(got, want) < 3e-2


def test_module_train_batch_one_raises_like_eager():
    eager, mine = _pair(16, 4)
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        eager(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        mine(x)


def test_from_module_shares_layers():
    eager = _randomise(ref.PATChannelFormula(40, 4))
    mine = PATChannel.from_module(eager)
    assert mine.partial_conv3 is eager.partial_conv3 and mine.norm is eager.norm
    assert mine.attn.cfc1 is eager.attn.cfc1 and mine.attn.bn is eager.attn.bn
    assert list(mine.state_dict()) == list(eager.state_dict())
    eager.eval()
    x = torch.randn(2, 40, 8, 8)
    with torch.no_grad():
        assert rel_error(mine(x), eager(x)) < 1e-5
    with pytest.raises(TypeError, match="PATChannel.from_module"):
        PATChannel.from_module(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match=r"must be in \[1, dim=8\)"):
        PATChannel(8, dim_conv=8)
    padded = copy.deepcopy(eager)
    padded.attn.cfc1.padding = (0, 1)
    with pytest.raises(ValueError, match="unsupported layer shapes"):
        PATChannel.from_module(padded)
    with pytest.raises(ValueError, match=r"PATChannel: x must have dim=40 channels, got shape \(2, 36, 8, 8\)"):
        mine(torch.randn(2, 36, 8, 8))
    with pytest.raises(ValueError, match=r"partial_conv2d_stats: x must be 4-D"):
        mine(torch.randn(2, 40, 8))


@pytest.mark.parametrize("training", [True, False])
def test_module_compiles_fullgraph(training):
    eager, mine = _pair(40, 4, dtype=torch.float32)
    eager.train(training), mine.train(training)
    x = torch.randn(2, 40, 9, 7, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(copy.deepcopy(mine), fullgraph=True)
    y = compiled(x.clone().requires_grad_())
    y.sum().backward()
    # train mode: the gate's BatchNorm over two images amplifies fp32 rounding
    assert rel_error(y, eager(x)) < (1e-4 if training else 1e-5)
