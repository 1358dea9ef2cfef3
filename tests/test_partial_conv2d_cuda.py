"""CUDA kernels of accel.ops.partial_conv2d, against the float64 split / conv2d / concatenate
reference and the CPU kernels: forward and gradients, float32/float64/bfloat16/float16, contiguous
and channels_last, odd and multi-tile sizes, strided inputs, batch 0, determinism, graph capture."""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from accel.ops import partial_conv2d  # noqa: E402
from accel.reference.partial_conv2d import partial_conv2d as reference  # noqa: E402
from pconv_cases import pconv_inputs, rel_error  # noqa: E402  (tests/ is on sys.path)

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16)

# (B, C, Cp, H, W)
SHAPES = [
    (2, 13, 3, 7, 5),
    (2, 40, 10, 17, 23),
    (2, 40, 10, 56, 56),
    (2, 320, 80, 7, 7),
    (3, 8, 4, 1, 1),
    (1, 24, 6, 37, 70),
    (2, 50, 20, 12, 13),
    (2, 40, 40, 9, 9),
    (1, 5, 5, 150, 3),
]


def _run(x, w, b, gy, cp, device):
    leaves = [t.detach().to(device).requires_grad_() for t in (x, w, b) if t is not None]  # keeps x's format
    y = partial_conv2d(leaves[0], leaves[1], leaves[2] if b is not None else None, dim_conv=cp)
    grads = torch.autograd.grad(y, leaves, gy.to(device))
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-Cp{}-{}x{}".format(*s))
def test_cuda_matches_reference_and_cpu(dtype, channels_last, shape):
    B, C, cp, H, W = shape
    x, w, b, gy = pconv_inputs(B, C, cp, H, W, dtype, channels_last, bias=cp % 2 == 0 or C == 13)
    y, grads = _run(x, w, b, gy, cp, "cuda")
    assert y.is_cuda and y.dtype == dtype and y.shape == x.shape
    fmt = torch.channels_last if channels_last and not x.is_contiguous() else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    # channels >= Cp are copied exactly
    assert torch.equal(y[:, cp:].cpu(), x[:, cp:])
    assert torch.equal(grads[0][:, cp:].cpu(), gy[:, cp:])

    ref_leaves = [t.double().requires_grad_() for t in (x, w, b) if t is not None]
    yr = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2] if b is not None else None, dim_conv=cp)
    refs = torch.autograd.grad(yr, ref_leaves, gy.double())
    tol = TOL[dtype]
    assert rel_error(y, yr) < tol
    for name, got, want in zip("xwb", grads, refs):
        assert got.dtype == dtype and got.is_cuda, name
        assert rel_error(got, want) < tol * (4 if dtype in (torch.bfloat16, torch.float16) else 1), name

    if dtype in CPU_DTYPES:
        yc, grads_c = _run(x, w, b, gy, cp, "cpu")
        assert rel_error(y, yc) < tol
        for name, got, want in zip("xwb", grads, grads_c):
            assert rel_error(got, want) < tol * (4 if dtype == torch.bfloat16 else 1), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_batch_zero(dtype, channels_last):
    x, w, b, gy = pconv_inputs(0, 16, 4, 5, 5, dtype, channels_last)
    y, (gx, gw, gb) = _run(x, w, b, gy, 4, "cuda")
    assert y.shape == (0, 16, 5, 5) and gx.shape == (0, 16, 5, 5)
    assert torch.equal(gw.cpu(), torch.zeros_like(w)) and torch.equal(gb.cpu(), torch.zeros_like(b))


def test_strided_input_and_expanded_grad():
    x = torch.randn(2, 24, 9, 22, dtype=torch.float64, device="cuda")[..., ::2].requires_grad_()  # strided along W
    w = torch.randn(6, 6, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    y = partial_conv2d(x, w)
    xr, wr = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    yr = reference(xr, wr)
    assert rel_error(y, yr) < 1e-12
    y.sum().backward()  # grad_out is an expanded scalar: every stride 0
    yr.sum().backward()
    assert rel_error(x.grad, xr.grad) < 1e-12 and rel_error(w.grad, wr.grad) < 1e-12


def test_output_mask_and_no_bias():
    x, w, _, gy = pconv_inputs(2, 40, 10, 17, 23, torch.float32, False, bias=False)
    xc, wc, gyc = x.cuda(), w.cuda(), gy.cuda()
    gx, gw, gb = torch.ops.accel.partial_conv2d_backward(gyc, xc, wc, None, 10, [False, True, True])
    assert gx.numel() == 0 and gb.numel() == 0 and gw.shape == w.shape
    gx2, gw2, gb2 = torch.ops.accel.partial_conv2d_backward(gyc, xc, wc, None, 10, [True, False, False])
    assert gx2.shape == x.shape and gw2.numel() == 0 and gb2.numel() == 0
    gxc, gwc, _ = torch.ops.accel.partial_conv2d_backward(gy, x, w, None, 10, [True, True, False])
    assert rel_error(gx2, gxc) < 2e-5 and rel_error(gw, gwc) < 2e-5


def test_backward_is_deterministic():
    x, w, b, gy = pconv_inputs(4, 64, 16, 28, 28, torch.float32, True)
    args = (gy.cuda(), x.cuda().contiguous(memory_format=torch.channels_last), w.cuda(), b.cuda(), 16,
            [True, True, True])
    first = torch.ops.accel.partial_conv2d_backward(*args)
    for _ in range(3):
        again = torch.ops.accel.partial_conv2d_backward(*args)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_dtype_and_device_errors():
    x = torch.randn(1, 8, 4, 4, device="cuda")
    with pytest.raises(TypeError):
        partial_conv2d(x.to(torch.int32), torch.randn(2, 2, 3, 3, device="cuda").to(torch.int32))
    with pytest.raises((RuntimeError, ValueError)):
        partial_conv2d(x, torch.randn(2, 2, 3, 3))  # weight on the CPU


def test_cuda_graph_capture():
    x = torch.randn(8, 40, 28, 28, device="cuda")
    w = torch.randn(10, 10, 3, 3, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        partial_conv2d(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = partial_conv2d(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(y, reference(x.double().cpu(), w.double().cpu())) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_in_place_cuda(dtype, channels_last):
    from accel.ops import partial_conv2d_

    for B, C, cp, H, W in [(2, 13, 3, 7, 5), (2, 40, 10, 37, 70), (2, 320, 80, 7, 7)]:
        x, w, b, _ = pconv_inputs(B, C, cp, H, W, dtype, channels_last)
        want = reference(x.double(), w.double(), b.double(), dim_conv=cp)
        xc = x.cuda()
        with torch.no_grad():
            assert partial_conv2d_(xc, w.cuda(), b.cuda(), dim_conv=cp) is xc
        assert torch.equal(xc[:, cp:].cpu(), x[:, cp:])
        assert rel_error(xc, want) < TOL[dtype]
