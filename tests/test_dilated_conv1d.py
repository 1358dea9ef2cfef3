"""accel.ops.dilated_conv1d on CPU against the pure-PyTorch reference."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import accel
from accel.ops import dilated_conv1d
from accel.reference import dilated_conv1d as reference

ACTS = [None, "relu", "gelu", "silu"]


def _make(B, c_in, c_out, L, K, groups, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, c_in, L, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(c_out, c_in // groups, K, generator=g, dtype=torch.float64) / (K * c_in // groups) ** 0.5).to(dtype)
    b = torch.randn(c_out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


def _grads(out, inputs, grad):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad, allow_unused=True)


def _check_against_reference(B, c_in, c_out, L, K, d, groups, padding, act, residual, atol=1e-10):
    x, w, b = _make(B, c_in, c_out, L, K, groups)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    expected = reference(x, w, b, dilation=d, padding=padding, groups=groups, activation=act)
    res = torch.randn_like(expected).requires_grad_() if residual else None
    if residual:
        expected = expected + res
    out = dilated_conv1d(x, w, b, dilation=d, padding=padding, groups=groups, activation=act, residual=res)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-9)
    grad = torch.randn_like(expected)
    inputs = [x, w, b] + ([res] if residual else [])
    for got, want in zip(_grads(out, inputs, grad), _grads(expected, inputs, grad)):
        torch.testing.assert_close(got, want, atol=atol * 10, rtol=1e-8)


# The grid: every K 1..9 and dilation up to 64 meet every group shape and padding mode across
# the cases (a full product would take minutes on two cores; a seeded sample of it covers each
# pair of options).
_GROUP_SHAPES = [(4, 4, 1), (6, 6, 6), (5, 10, 5), (6, 9, 3), (8, 4, 2)]  # (c_in, c_out, groups)
_PADDINGS = ["causal", "same", 0, 3]
_LENGTHS = [1, 2, 7, 33, 127, 1000, 2049, 4099]


def _grid():
    rng = random.Random(1234)
    cases = []
    for K, d in itertools.product(range(1, 10), [1, 2, 3, 7, 16, 64]):
        c_in, c_out, groups = _GROUP_SHAPES[(K + d) % len(_GROUP_SHAPES)]
        padding = _PADDINGS[(K * 3 + d) % len(_PADDINGS)]
        L = rng.choice(_LENGTHS)
        span = (K - 1) * d
        if isinstance(padding, int) and L + 2 * padding - span <= 0:
            padding = "causal"  # int padding that leaves no output is an error, tested separately
        act = ACTS[(K + 2 * d) % 4]
        cases.append((rng.choice([1, 2]), c_in, c_out, L, K, d, groups, padding, act, (K + d) % 3 == 0))
    return cases


@pytest.mark.parametrize("B,c_in,c_out,L,K,d,groups,padding,act,residual", _grid())
def test_matches_reference_fp64(B, c_in, c_out, L, K, d, groups, padding, act, residual):
    _check_against_reference(B, c_in, c_out, L, K, d, groups, padding, act, residual)


@pytest.mark.parametrize("groups", ["depthwise", 1, 2])
@pytest.mark.parametrize("padding", ["causal", "same", 5])
@pytest.mark.parametrize("act", ACTS)
def test_options(groups, padding, act):
    c = 8
    g = c if groups == "depthwise" else groups
    _check_against_reference(2, c, c, 301, 5, 3, g, padding, act, residual=False)


@pytest.mark.parametrize("L", [1, 3, 10])
def test_sequence_shorter_than_receptive_field(L):
    # receptive field (9-1)*64+1 = 513 >> L: most taps read padding
    _check_against_reference(2, 4, 4, L, 9, 64, 4, "causal", "gelu", residual=True)
    _check_against_reference(2, 4, 4, L, 9, 64, 1, "same", None, residual=False)


def test_long_sequence_depthwise():
    _check_against_reference(1, 3, 3, 70001, 7, 64, 3, "causal", "silu", residual=True)


def test_multiplier_depthwise():
    # groups == C_in with C_out = 3 * C_in (channel multiplier)
    _check_against_reference(2, 4, 12, 257, 3, 5, 4, "causal", "relu", residual=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", ["depthwise", 1])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_low_precision_error_bounded_by_eager(dtype, groups, act):
    """The kernel's error vs an fp64 reference is at most ~2x the eager formula's in the same dtype."""
    c = 16
    g = c if groups == "depthwise" else 1
    x64, w64, b64 = _make(2, c, c, 3001, 5, g)
    expected = reference(x64, w64, b64, dilation=4, padding="causal", groups=g, activation=act)
    x, w, b = (t.to(dtype).requires_grad_() for t in (x64, w64, b64))
    out = dilated_conv1d(x, w, b, dilation=4, padding="causal", groups=g, activation=act)
    eager = reference(x, w, b, dilation=4, padding="causal", groups=g, activation=act)
    assert out.dtype == dtype

    def err(t, ref):
        return (t.double() - ref).abs().max().item()

    tiny = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    assert err(out, expected) <= 2 * err(eager, expected) + tiny
    # gradients against fp64 autograd of the reference
    grad64 = torch.randn_like(expected)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x64, w64, b64))
    want = torch.autograd.grad(reference(xr, wr, br, dilation=4, padding="causal", groups=g, activation=act),
                               (xr, wr, br), grad64)
    got = torch.autograd.grad(out, (x, w, b), grad64.to(dtype))
    eager_g = torch.autograd.grad(eager, (x, w, b), grad64.to(dtype))
    for name, gk, ge, gw in zip("xwb", got, eager_g, want):
        scale = gw.abs().max().item()
        assert err(gk, gw) <= 2 * err(ge, gw) + tiny * scale, name


def test_fp32_close_to_fp64():
    x, w, b = _make(2, 32, 32, 5000, 7, 32)
    expected = reference(x, w, b, dilation=16, padding="causal", groups=32, activation="gelu")
    out = dilated_conv1d(x.float(), w.float(), b.float(), dilation=16, padding="causal", groups=32, activation="gelu")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [3, 1])
@pytest.mark.parametrize("act", [None, "silu"])
def test_gradcheck_fp64(groups, act):
    x, w, b = _make(2, 3, 3, 11, 3, groups)
    res = torch.randn(2, 3, 11, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, w, b, res))
    fn = lambda x, w, b, r: dilated_conv1d(x, w, b, dilation=2, padding="causal", groups=groups, activation=act,
                                           residual=r)
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_same_and_int_padding():
    x, w, b = _make(1, 4, 2, 9, 4, 2)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    for padding in ["same", 2]:
        fn = lambda x, w, b: dilated_conv1d(x, w, b, dilation=3, padding=padding, groups=2, activation="gelu")
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("groups", [4, 2])
def test_opcheck(groups):
    x, w, b = _make(2, 4, 4, 37, 3, groups, dtype=torch.float32)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), None, 2, 4, 37, groups, "gelu")
    torch.library.opcheck(torch.ops.accel.dilated_conv1d.default, args)
    grad = torch.randn(2, 4, 37)
    bargs = (grad, x.detach(), w.detach(), b.detach(), 2, 4, groups, "gelu", [True, True, True])
    torch.library.opcheck(torch.ops.accel.dilated_conv1d_backward.default, bargs)


def test_torch_compile_fullgraph():
    x, w, b = _make(2, 8, 8, 100, 3, 8, dtype=torch.float32)
    conv = accel.nn.DilatedConv1d(8, 8, 3, padding="causal", dilation=4, groups=8, activation="gelu")

    def fn(x):
        return conv(x, residual=x).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xr = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    eager = fn(xr)
    eager.backward()
    out = compiled(xc)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(xc.grad, xr.grad)


def test_non_contiguous_inputs():
    x, w, b = _make(3, 6, 6, 50, 3, 3)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-channel permuted strides
    assert not x_nc.is_contiguous()
    x_sliced = torch.randn(3, 6, 120, dtype=torch.float64)[:, :, ::2]
    w_nc = w.transpose(1, 2).contiguous().transpose(1, 2)
    for xi in (x_nc, x_sliced):
        torch.testing.assert_close(dilated_conv1d(xi, w_nc, b, dilation=2, groups=3),
                                   reference(xi, w, b, dilation=2, groups=3))


def test_batch_zero_and_empty_length():
    x, w, b = _make(0, 4, 4, 33, 3, 4)
    out = dilated_conv1d(x, w, b, dilation=2, groups=4)
    assert out.shape == (0, 4, 33)
    x = x.requires_grad_()
    out = dilated_conv1d(x, w.requires_grad_(), b.requires_grad_(), dilation=2, groups=4)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(w.grad) == 0
    empty = dilated_conv1d(torch.zeros(2, 4, 0, dtype=torch.float64), w.detach(), None, groups=4)
    assert empty.shape == (2, 4, 0)


def test_int_padding_longer_output():
    # int padding larger than the span extends the output beyond L on both sides
    _check_against_reference(1, 2, 2, 5, 2, 1, 2, 4, None, residual=False)


# ------------------------------------------------------------------------------- bad inputs

def _bad(match, *args, exc=ValueError, **kwargs):
    with pytest.raises(exc, match=match):
        dilated_conv1d(*args, **kwargs)


def test_bad_rank():
    _bad("x must be 3-D", torch.randn(4, 10), torch.randn(4, 1, 3), groups=4)
    _bad("weight must be 3-D", torch.randn(1, 4, 10), torch.randn(4, 3), groups=4)


def test_bad_rank_reaches_native_check():
    # calling the registered op directly hits the TORCH_CHECKs, not only the Python wrapper's
    with pytest.raises(ValueError, match=r"x must be 3-D \(B, C_in, L\), got shape \[4, 10\]"):
        torch.ops.accel.dilated_conv1d(torch.randn(4, 10), torch.randn(4, 1, 3), None, None, 1, 2, 10, 4, "none")
    with pytest.raises(ValueError, match="groups=3 must divide the input channels"):
        torch.ops.accel.dilated_conv1d(torch.randn(1, 4, 10), torch.randn(3, 1, 3), None, None, 1, 2, 10, 3, "none")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.accel.dilated_conv1d(torch.randn(1, 4, 10), torch.randn(4, 1, 3), None, None, 1, 2, 10, 4, "tanh")
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        torch.ops.accel.dilated_conv1d(torch.randn(1, 4, 10), torch.randn(4, 1, 3), None, None, 0, 2, 10, 4, "none")


def test_bad_dtype_mismatch():
    _bad("weight has dtype Double but x has dtype Float", torch.randn(1, 4, 10),
         torch.randn(4, 1, 3, dtype=torch.float64), groups=4, exc=TypeError)
    _bad("bias has dtype", torch.randn(1, 4, 10), torch.randn(4, 1, 3), torch.randn(4, dtype=torch.float64), groups=4,
         exc=TypeError)
    _bad("floating-point", torch.ones(1, 4, 10, dtype=torch.int64), torch.ones(4, 1, 3, dtype=torch.int64), groups=4,
         exc=TypeError)


def test_bad_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device (CUDA); covered in test_dilated_conv1d_cuda.py")
    _bad("same device", torch.randn(1, 4, 10), torch.randn(4, 1, 3, device="cuda"), groups=4)


def test_bad_groups():
    _bad("groups=3 must divide the input channels", torch.randn(1, 4, 10), torch.randn(3, 1, 3), groups=3)
    _bad("groups=2 must divide the output channels", torch.randn(1, 4, 10), torch.randn(3, 2, 3), groups=2)
    _bad(r"= \(4, 2, K\), got \[4, 1, 3\]", torch.randn(1, 4, 10), torch.randn(4, 1, 3), groups=2)
    _bad("groups must be >= 1, got 0", torch.randn(1, 4, 10), torch.randn(4, 1, 3), groups=0)


def test_bad_dilation():
    _bad("dilation must be >= 1, got 0", torch.randn(1, 4, 10), torch.randn(4, 1, 3), dilation=0, groups=4)
    _bad("dilation must be an int, got 2.0", torch.randn(1, 4, 10), torch.randn(4, 1, 3), dilation=2.0, groups=4,
         exc=TypeError)


def test_bad_padding_leaves_no_output():
    _bad("leaves no output", torch.randn(1, 4, 5), torch.randn(4, 1, 9), padding=0, groups=4)
    _bad("padding must be", torch.randn(1, 4, 5), torch.randn(4, 1, 3), padding="full", groups=4)
    _bad("padding must be >= 0", torch.randn(1, 4, 5), torch.randn(4, 1, 3), padding=-1, groups=4)


def test_bad_activation_and_residual():
    _bad("activation must be", torch.randn(1, 4, 10), torch.randn(4, 1, 3), groups=4, activation="tanh")
    _bad("residual must have the output's shape", torch.randn(1, 4, 10), torch.randn(4, 1, 3), groups=4,
         residual=torch.randn(1, 4, 9))


def test_functional_matches_nn_conv1d():
    conv = torch.nn.Conv1d(6, 6, 5, dilation=3, padding=6, groups=6)
    x = torch.randn(2, 6, 77)
    torch.testing.assert_close(dilated_conv1d(x, conv.weight, conv.bias, dilation=3, padding=6, groups=6), conv(x),
                               atol=1e-5, rtol=1e-5)
    y = F.conv1d(F.pad(x, (12, 0)), conv.weight, conv.bias, dilation=3, groups=6)
    torch.testing.assert_close(dilated_conv1d(x, conv.weight, conv.bias, dilation=3, groups=6), y,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("c_in,c_out,groups", [(8, 8, 1), (8, 12, 2), (16, 8, 2), (130, 70, 1)])
@pytest.mark.parametrize("K,d,padding,L", [(1, 1, "causal", 1), (3, 5, "same", 130), (7, 2, 4, 1000),
                                           (4, 64, "causal", 300)])
@pytest.mark.parametrize("act,residual", [(None, False), ("gelu", True)])
def test_gemm_path_fp32(c_in, c_out, groups, K, d, padding, L, act, residual):
    """>= 4 channels per group in fp32 runs the im2col + brgemm path: compare with fp64."""
    x64, w64, b64 = _make(2, c_in, c_out, L, K, groups)
    expected = reference(x64, w64, b64, dilation=d, padding=padding, groups=groups, activation=act)
    res64 = torch.randn_like(expected) if residual else None
    if residual:
        expected = expected + res64
    x, w, b = (t.float().requires_grad_() for t in (x64, w64, b64))
    res = res64.float() if residual else None
    out = dilated_conv1d(x, w, b, dilation=d, padding=padding, groups=groups, activation=act, residual=res)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    grad = torch.randn_like(expected)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x64, w64, b64))
    ref_out = reference(xr, wr, br, dilation=d, padding=padding, groups=groups, activation=act)
    want = torch.autograd.grad(ref_out, (xr, wr, br), grad)
    got = torch.autograd.grad(out, (x, w, b), grad.float())
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=1e-4 * max(1.0, e.abs().max().item()), rtol=1e-4)


def test_opcheck_non_contiguous_inputs():
    x, w, b = _make(2, 4, 4, 37, 3, 4, dtype=torch.float32)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)
    args = (x_nc.requires_grad_(), w, b, None, 2, 4, 37, 4, "none")
    torch.library.opcheck(torch.ops.accel.dilated_conv1d.default, args)
    bargs = (torch.randn(2, 4, 37), x_nc.detach(), w, b, 2, 4, 4, "silu", [True, True, False])
    torch.library.opcheck(torch.ops.accel.dilated_conv1d_backward.default, bargs)


def test_torch_compile_inductor_fullgraph():
    """The default backend (inductor) traces through the op and its backward, with the fake kernel."""
    x, w, b = _make(2, 8, 8, 64, 3, 8, dtype=torch.float32)

    def fn(x, w, b):
        y = dilated_conv1d(x, w, b, dilation=2, groups=8, activation="silu", residual=x)
        return (y * 2.0).sum()

    compiled = torch.compile(fn, fullgraph=True)
    args_c = [t.clone().requires_grad_() for t in (x, w, b)]
    args_e = [t.clone().requires_grad_() for t in (x, w, b)]
    out_c, out_e = compiled(*args_c), fn(*args_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(args_c, args_e):
        torch.testing.assert_close(a.grad, e.grad)
