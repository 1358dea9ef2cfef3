"""accel.ops.partial_conv2d and accel.nn.PartialConv2d against the split / conv2d / concatenate
reference: the issue's grid of channels, n_div and image sizes, both memory formats, gradients,
bad inputs. (The op contract test covers opcheck, torch.compile and gradcheck on its examples.)"""
import pytest
import torch
from torch import nn

from accel.nn import PartialConv2d
from accel.ops import partial_conv2d, partial_conv2d_
from accel.reference.partial_conv2d import partial_conv2d as reference
from pconv_cases import pconv_inputs, rel_error  # tests/ is on sys.path (pytest rootdir-based import)

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}
SIZES = [(1, 1), (3, 5), (7, 7), (14, 14), (17, 23), (56, 56)]


def _check(B, C, H, W, cp, dtype, channels_last, bias=True, seed=0):
    x, w, b, gy = pconv_inputs(B, C, cp, H, W, dtype, channels_last, bias, seed)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = partial_conv2d(x, w, b, dim_conv=cp)
    assert y.shape == x.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last and not x.is_contiguous()
                           else torch.contiguous_format)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    yr = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, dim_conv=cp)
    assert rel_error(y, yr) < TOL[dtype]
    grads = torch.autograd.grad(y, leaves, gy)
    refs = torch.autograd.grad(yr, ref_leaves, gy.double())
    for name, got, want in zip("xwb", grads, refs):
        assert got.dtype == dtype, name
        assert rel_error(got, want) < TOL[dtype] * (4 if dtype == torch.bfloat16 else 1), name


@pytest.mark.parametrize("C", [16, 40, 64, 96, 130])
@pytest.mark.parametrize("n_div", [2, 4, 8])
def test_grid_n_div(C, n_div):
    for i, (H, W) in enumerate(SIZES):
        _check(2, C, H, W, C // n_div, torch.float32, channels_last=i % 2 == 1, seed=i)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("H, W", SIZES)
def test_dtypes_layouts_sizes(dtype, channels_last, H, W):
    _check(2, 40, H, W, 10, dtype, channels_last)


@pytest.mark.parametrize("cp", [1, 7, 33, 40])
def test_explicit_dim_conv_and_no_bias(cp):
    _check(3, 40, 9, 13, cp, torch.float32, channels_last=False, bias=cp % 2 == 0)


def test_batch_zero_and_wide_stage():
    _check(0, 16, 5, 5, 4, torch.float32, channels_last=False)
    _check(2, 320, 7, 7, 80, torch.float32, channels_last=False)
    _check(2, 320, 7, 7, 80, torch.float32, channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_large_calls(channels_last):
    # enough work for the library convolution where the CPU has bf16 dot products (accel's own
    # kernels elsewhere): both must meet the reference
    _check(8, 160, 14, 14, 40, torch.bfloat16, channels_last)
    _check(2, 320, 7, 7, 80, torch.bfloat16, channels_last)


def test_non_contiguous_input():
    x = torch.randn(2, 24, 9, 22, dtype=torch.float64)[..., ::2]  # strided along W
    w = torch.randn(6, 6, 3, 3, dtype=torch.float64)
    assert rel_error(partial_conv2d(x, w), reference(x, w)) < 1e-12


def test_fp64_stays_fp64():
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64) * 1e-3 + 1.0
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert rel_error(partial_conv2d(x, w), reference(x, w)) < 1e-14


@pytest.mark.parametrize("args, kwargs, err, match", [
    (((2, 16, 5, 5), (3, 3, 3, 3)), {}, ValueError, r"weight must have shape \(Cp, Cp, 3, 3\) = \(4, 4, 3, 3\)"),
    (((2, 16, 5, 5), (4, 4, 5, 5)), {}, ValueError, r"weight must have shape"),
    (((2, 16, 5, 5), (17, 17, 3, 3)), {"dim_conv": 17}, ValueError, r"dim_conv .* must be in \[1, 16\]"),
    (((2, 16, 5, 5), (4, 4, 3, 3)), {"n_div": 0}, ValueError, r"n_div must be >= 1"),
    (((16, 5, 5), (4, 4, 3, 3)), {}, ValueError, r"x must be 4-D"),
])
def test_bad_shapes(args, kwargs, err, match):
    x, w = (torch.randn(*s) for s in args)
    with pytest.raises(err, match=match):
        partial_conv2d(x, w, **kwargs)


def test_bad_dtype_device_bias():
    x = torch.randn(2, 16, 5, 5)
    with pytest.raises(TypeError, match="weight"):
        partial_conv2d(x, torch.randn(4, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        partial_conv2d(x, torch.randn(4, 4, 3, 3), torch.randn(5))
    with pytest.raises(TypeError, match="float16"):
        partial_conv2d(x.half(), torch.randn(4, 4, 3, 3).half())
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        partial_conv2d(x, torch.randn(4, 4, 3, 3, device="meta"))


def test_module_matches_timm_layout():
    m = PartialConv2d(40, 4)
    assert (m.dim_conv3, m.dim_untouched) == (10, 30)
    assert list(m.state_dict()) == ["partial_conv3.weight"]
    x = torch.randn(2, 40, 11, 11)
    assert rel_error(m(x), reference(x, m.partial_conv3.weight, dim_conv=10)) < 1e-5
    with pytest.raises(ValueError, match="forward must be"):
        PartialConv2d(40, 4, "inplace")
    with pytest.raises(ValueError, match=r"in \[1, dim=8\]"):
        PartialConv2d(8, dim_conv=9)


def test_from_module_shares_the_conv():
    class Timmish(nn.Module):
        def __init__(self):
            super().__init__()
            self.dim_conv3, self.dim_untouched = 6, 18
            self.partial_conv3 = nn.Conv2d(6, 6, 3, 1, 1, bias=False)

    src = Timmish()
    m = PartialConv2d.from_module(src)
    assert m.partial_conv3 is src.partial_conv3
    src.partial_conv3 = nn.Conv2d(6, 6, 3, 1, 2, bias=False)
    with pytest.raises(ValueError, match="padding 1"):
        PartialConv2d.from_module(src)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("B, C, H, W, cp", [(2, 13, 7, 5, 3), (2, 40, 17, 23, 10), (2, 320, 7, 7, 80),
                                            (8, 160, 14, 14, 40), (0, 16, 5, 5, 4)])
def test_in_place(dtype, channels_last, B, C, H, W, cp):
    x, w, b, _ = pconv_inputs(B, C, cp, H, W, dtype, channels_last)
    want = reference(x.double(), w.double(), b.double(), dim_conv=cp)
    before = x.clone()
    with torch.no_grad():
        got = partial_conv2d_(x, w, b, dim_conv=cp)
    assert got is x and x.stride() == before.stride()
    assert torch.equal(x[:, cp:], before[:, cp:])  # the other channels untouched
    assert rel_error(x, want) < TOL[dtype]


def test_in_place_errors():
    x, w = torch.randn(2, 16, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.raises(RuntimeError, match="is for inference"):
        partial_conv2d_(x, w.requires_grad_())
    big = torch.randn(2, 16, 5, 5)
    with pytest.raises(ValueError, match="weight shares memory with x"):
        partial_conv2d_(big, big[0, :4, :3, :3].unsqueeze(0).expand(4, 4, 3, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \(Cp, Cp, 3, 3\)"):
        partial_conv2d_(x, torch.randn(3, 3, 3, 3))
