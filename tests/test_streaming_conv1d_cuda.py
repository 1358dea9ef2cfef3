"""CUDA kernels of accel.ops.streaming_conv1d, against the CPU kernel and the float64 reference:
outputs and the advanced state, slots and padding rows, CUDA graph capture of a decode loop."""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

import accel.reference as ref  # noqa: E402
from accel.ops import streaming_conv1d, streaming_conv1d_stack  # noqa: E402
from accel.ops.streaming_conv1d import _ring_index  # noqa: E402
from test_streaming_conv1d import TOL, _inputs  # noqa: E402  (tests/ is on sys.path)

# (B, C_in, C_out, groups, K, dilation, h, extra state, activation, indexed)
GRID = [
    (32, 2048, 2048, 2048, 4, 1, 1, 0, "silu", False),
    (5, 301, 301, 301, 4, 1, 1, 1, "silu", True),
    (2, 7, 7, 7, 5, 3, 129, 2, "gelu", True),
    (3, 4, 6, 2, 2, 3, 13, 0, "gelu", True),
    (2, 16, 16, 1, 3, 64, 300, 5, "relu", False),
    (1, 8, 8, 1, 1, 1, 5, 0, None, False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GRID, ids=lambda c: "B{}-C{}-{}-g{}-K{}-d{}-h{}-x{}-{}-{}".format(*c))
def test_cuda_matches_reference_and_cpu(dtype, case):
    B, cin, cout, groups, K, d, h, extra, act, indexed = case
    x, state, w, b, idx = _inputs(dtype, B, cin, cout, groups, K, d, h, extra, indexed)
    kw = dict(dilation=d, groups=groups, activation=act)
    want_state = state.double()
    want = ref.streaming_conv1d(x.double(), want_state, w.double(), b.double(), state_indices=idx, **kw)
    cpu_state = state.clone()
    cpu = streaming_conv1d(x, cpu_state, w, b, state_indices=idx, **kw)
    gpu_state = state.cuda()
    gpu = streaming_conv1d(x.cuda(), gpu_state, w.cuda(), b.cuda(), state_indices=None if idx is None else idx.cuda(),
                           **kw)
    torch.testing.assert_close(gpu.double().cpu(), want, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(gpu_state.cpu(), want_state.to(dtype))


def test_out_of_range_slot_is_padding_on_cuda():
    x, state = torch.randn(3, 8, 1, device="cuda"), torch.randn(4, 8, 3, device="cuda")
    w = torch.randn(8, 1, 4, device="cuda")
    before = state.clone()
    y = streaming_conv1d(x, state, w, groups=8, state_indices=torch.tensor([9, 1, -5], dtype=torch.int32,
                                                                            device="cuda"))
    assert torch.equal(y[0], torch.zeros_like(y[0])) and torch.equal(y[2], torch.zeros_like(y[2]))
    assert torch.equal(state[[0, 2, 3]], before[[0, 2, 3]]) and not torch.equal(state[1], before[1])


def test_cuda_graph_capture_decode_loop():
    B, C, K = 8, 512, 4
    w, b = torch.randn(C, 1, K, device="cuda"), torch.randn(C, device="cuda")
    x = torch.randn(B, C, 1, device="cuda")
    state = torch.zeros(B, C, K - 1, device="cuda")
    idx = torch.arange(B, dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        streaming_conv1d(x, state, w, b, groups=C, activation="silu", state_indices=idx)
    torch.cuda.current_stream().wait_stream(stream)
    state.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = streaming_conv1d(x, state, w, b, groups=C, activation="silu", state_indices=idx)
    state.zero_()
    ref_state = torch.zeros(B, C, K - 1, dtype=torch.float64)
    for step in range(5):
        x.copy_(torch.randn(B, C, 1, device="cuda"))
        graph.replay()
        want = ref.streaming_conv1d(x.double().cpu(), ref_state, w.double().cpu(), b.double().cpu(), groups=C,
                                    activation="silu")
        torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    torch.testing.assert_close(state.double().cpu(), ref_state)


def test_compile_fullgraph_cuda():
    torch._dynamo.reset()
    w = torch.randn(16, 1, 4, device="cuda")
    compiled = torch.compile(lambda x, s: streaming_conv1d(x, s, w, groups=16), fullgraph=True)
    s1, s2 = torch.zeros(2, 16, 3, device="cuda"), torch.zeros(2, 16, 3, device="cuda")
    for _ in range(3):
        x = torch.randn(2, 16, 1, device="cuda")
        torch.testing.assert_close(compiled(x, s1), streaming_conv1d(x, s2, w, groups=16))
    torch.testing.assert_close(s1, s2)


def test_cuda_stack_matches_cpu():
    """accel.nn.StreamingTCN (one streaming_conv1d_stack call per chunk) on CUDA equals it on the CPU."""
    from accel.nn import TCN, StreamingTCN

    torch.manual_seed(0)
    tcn = TCN(64, kernel_size=3, num_layers=8, activation="gelu").requires_grad_(False)
    cpu, gpu = StreamingTCN(tcn), StreamingTCN(TCN(64, kernel_size=3, num_layers=8).cuda())
    gpu.tcn.load_state_dict(tcn.state_dict())
    cpu.reset(3)
    gpu.reset(3)
    x = torch.randn(3, 64, 200)
    with torch.no_grad():
        for t, h in ((0, 1), (1, 64), (65, 135)):
            torch.testing.assert_close(gpu.step(x[..., t:t + h].cuda()).cpu(), cpu.step(x[..., t:t + h]),
                                       rtol=1e-4, atol=1e-4)
    for a, b in zip(gpu._states, cpu._states):  # the CPU's states are rings
        torch.testing.assert_close(a.cpu(), b.gather(2, _ring_index(cpu.positions, b)), rtol=1e-4, atol=1e-4)
    # moved mid-stream, the CPU's rings become the device's linear states; and the op's rings on CUDA
    moved = copy.deepcopy(cpu).cuda()
    assert not moved.positions.any()
    ring_states = [s.clone().cuda() for s in cpu._states]
    positions = cpu.positions.clone().cuda()
    y = x[..., 100:137]
    with torch.no_grad():
        want = cpu.step(y)
        torch.testing.assert_close(moved.step(y.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)
        got = streaming_conv1d_stack(y.cuda(), ring_states, moved._weights, moved._biases, dilations=moved._dilations,
                                     groups=moved._groups, activation="gelu", residual=True, positions=positions)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(positions.cpu(), cpu.positions)
    for a, b in zip(ring_states, cpu._states):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
