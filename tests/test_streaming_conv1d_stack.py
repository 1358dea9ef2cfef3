"""accel.ops.streaming_conv1d_stack and accel.nn.StreamingTCN: a stack of streaming convolutions in
one call equals the layers called one by one, checks every layer before writing, and streams a TCN
exactly."""
import copy

import pytest
import torch

import accel.reference as ref
from accel.nn import TCN, StreamingTCN
from accel.ops import streaming_conv1d, streaming_conv1d_stack

from streaming_chunks import chunk_lengths  # tests/ is on sys.path (pytest rootdir-based import)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _stack(dtype, B, channels, Ks, dilations, groups, h, extra=0, slots=None, seed=0):
    """Inputs of a stack whose layer i maps channels[i] -> channels[i + 1]."""
    g = torch.Generator().manual_seed(seed)
    S = B if slots is None else slots
    x = torch.randn(B, channels[0], h, generator=g).to(dtype)
    states, weights, biases = [], [], []
    for i, (K, d, gr) in enumerate(zip(Ks, dilations, groups)):
        cin, cout = channels[i], channels[i + 1]
        states.append(torch.randn(S, cin, (K - 1) * d + extra, generator=g).to(dtype))
        weights.append((torch.randn(cout, cin // gr, K, generator=g) / (cin // gr * K) ** 0.5).to(dtype))
        biases.append(None if i % 2 else torch.randn(cout, generator=g).to(dtype))
    return x, states, weights, biases


CASES = [  # (B, channels, Ks, dilations, groups, h, residual, indexed)
    (2, (16, 16, 16, 16), (3, 3, 3), (1, 2, 4), (16, 16, 16), 1, True, False),
    (3, (9, 9, 9), (4, 2), (1, 64), (9, 9), 37, True, True),
    (2, (4, 6, 3), (3, 2), (5, 1), (2, 1), 13, False, False),
    (1, (8, 8), (3,), (512,), (8,), 300, True, False),
    (2, (64, 64, 64), (3, 3), (1, 128), (64, 64), 100, True, True),  # enough work for every thread
]


def _depthwise(channels, groups):
    return all(gr == c for gr, c in zip(groups, channels)) and len(set(channels)) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-C{'-'.join(map(str, c[1]))}-h{c[5]}-r{int(c[6])}")
def test_stack_equals_the_layers_one_by_one(dtype, case):
    B, channels, Ks, dilations, groups, h, residual, indexed = case
    slots = B + 2 if indexed else None
    x, states, weights, biases = _stack(dtype, B, channels, Ks, dilations, groups, h, extra=1, slots=slots)
    initial = [s.clone() for s in states]
    idx = torch.tensor([B + 1] + list(range(B - 1)), dtype=torch.int32)[:B] if indexed else None
    if indexed:
        idx[-1] = -1
    one_by_one = [s.clone() for s in states]
    want = x
    for s, w, b, d, gr in zip(one_by_one, weights, biases, dilations, groups):
        y = streaming_conv1d(want, s, w, b, dilation=d, groups=gr, activation="gelu", state_indices=idx)
        want = y + want if residual else y
    got = streaming_conv1d_stack(x, states, weights, biases, dilations=dilations, groups=list(groups),
                                 activation="gelu", residual=residual, state_indices=idx)
    assert got.dtype == dtype and got.shape == want.shape
    if _depthwise(channels, groups) and x.device.type == "cpu":
        # the CPU's fused depthwise stack: the same sums, the residual added before the one rounding
        tol = {torch.float64: 1e-13, torch.float32: 2e-6}.get(dtype, TOL[dtype])
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for s, t in zip(states, one_by_one):  # a state holds layer inputs: equal up to the same rounding
            torch.testing.assert_close(s, t, rtol=tol, atol=tol)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernels in the same order
        for s, t in zip(states, one_by_one):
            assert torch.equal(s, t)
    # and against the float64 reference
    x64, w64 = x.double(), [w.double() for w in weights]
    b64 = [None if b is None else b.double() for b in biases]
    ref_states = [s.double() for s in initial]
    want64 = ref.streaming_conv1d_stack(x64, ref_states, w64, b64, dilations=dilations, groups=list(groups),
                                        activation="gelu", residual=residual, state_indices=idx)
    torch.testing.assert_close(got.double(), want64, rtol=TOL[dtype], atol=TOL[dtype] * len(Ks))


def _roll_in(states, positions):
    """Linear states (oldest sample first) laid out as rings starting at positions[s] % L_s."""
    return [torch.stack([row.roll(int(p) % max(st.shape[-1], 1), -1) for row, p in zip(st, positions)])
            for st in states]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-C{'-'.join(map(str, c[1]))}-r{int(c[6])}")
def test_ring_states_step_as_linear_ones(dtype, case):
    B, channels, Ks, dilations, groups, _, residual, indexed = case
    S = B + 2 if indexed else B
    x, linear, weights, biases = _stack(dtype, B, channels, Ks, dilations, groups, 1, extra=1, slots=S, seed=5)
    idx = torch.tensor([B + 1] + list(range(B - 1)), dtype=torch.int32)[:B] if indexed else None
    if indexed:
        idx[-1] = -1
    positions = torch.tensor([7 * s + 3 for s in range(S)], dtype=torch.int64)
    rings = _roll_in(linear, positions)
    live = [s for s in range(S) if idx is None or s in idx.tolist()]
    g = torch.Generator().manual_seed(6)
    for h in (1, 5, 600, 2, 131):  # wrap-around, chunks longer than the longest state
        x = torch.randn(B, channels[0], h, generator=g).to(dtype)
        kw = dict(dilations=dilations, groups=list(groups), activation="silu", residual=residual, state_indices=idx)
        want = streaming_conv1d_stack(x, linear, weights, biases, **kw)
        before = positions.clone()
        got = streaming_conv1d_stack(x, rings, weights, biases, positions=positions, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert positions.tolist() == [int(p) + (h if s in live else 0) for s, p in enumerate(before)]
        for r, lin in zip(rings, _roll_in(linear, positions)):
            assert torch.equal(r, lin)
    # the reference's rings agree
    ref_rings, ref_pos = [r.double().clone() for r in rings], positions.clone()
    x = torch.randn(B, channels[0], 9, generator=g).to(dtype)
    want = ref.streaming_conv1d_stack(x.double(), ref_rings, [w.double() for w in weights],
                                      [None if b is None else b.double() for b in biases], dilations=dilations,
                                      groups=list(groups), activation="gelu", residual=residual, state_indices=idx,
                                      positions=ref_pos)
    got = streaming_conv1d_stack(x, rings, weights, biases, dilations=dilations, groups=list(groups),
                                 activation="gelu", residual=residual, state_indices=idx, positions=positions)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * len(Ks))
    assert torch.equal(positions, ref_pos)
    for r, t in zip(rings, ref_rings):
        torch.testing.assert_close(r.double(), t, rtol=TOL[dtype], atol=TOL[dtype])


def test_ring_gradients_and_bad_positions():
    x, linear, weights, biases = _stack(torch.float64, 2, (6, 6, 6), (3, 2), (1, 3), (6, 6), 7, seed=8)
    positions = torch.tensor([5, 12], dtype=torch.int64)
    rings = _roll_in(linear, positions)
    leaves = [t.requires_grad_() for t in [x, *weights]]
    kw = dict(dilations=(1, 3), groups=6, activation="gelu", residual=True)
    got = streaming_conv1d_stack(x, rings, weights, biases, positions=positions, **kw)
    want = streaming_conv1d_stack(x, linear, weights, biases, **kw)
    for a, b in zip(torch.autograd.grad(got.square().sum(), leaves), torch.autograd.grad(want.square().sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert positions.tolist() == [12, 19]
    for r, lin in zip(rings, _roll_in(linear, positions)):
        assert torch.equal(r, lin)
    x = x.detach()
    before = [r.clone() for r in rings]
    bad = [(torch.tensor([1, 2], dtype=torch.int32), TypeError, "positions must be int64"),
           (torch.tensor([1, 2, 3]), ValueError, "positions must be a contiguous \\(S,\\) = \\(2,\\)"),
           (torch.tensor([4, -1]), ValueError, "positions\\[1\\] = -1 must be >= 0")]
    for pos, exc, match in bad:
        with pytest.raises(exc, match=match):
            streaming_conv1d_stack(x, rings, [w.detach() for w in weights], biases, positions=pos, **kw)
        for r, b in zip(rings, before):
            assert torch.equal(r, b)


def test_a_bad_layer_is_named_and_no_state_moves():
    x, states, weights, biases = _stack(torch.float32, 2, (8, 8, 8, 8), (3, 3, 3), (1, 2, 4), (8, 8, 8), 5)
    before = [s.clone() for s in states]
    bad = [(dict(weights=weights[:2] + [torch.randn(8, 2, 3)]), ValueError, "layer 2: streaming_conv1d: weight"),
           (dict(states=states[:1] + [states[1].double()] + states[2:]), TypeError, "layer 1: streaming_conv1d: state"),
           (dict(states=states[:2] + [torch.randn(2, 8, 3)]), ValueError, "layer 2: .*at least \\(K-1\\)\\*dilation"),
           (dict(dilations=(1, 2)), ValueError, "one entry per layer"),
           (dict(states=[states[0], states[0], states[2]], dilations=(1, 1, 4)), ValueError,
            "layers 0 and 1 share memory")]
    for change, exc, match in bad:
        args = dict(states=states, weights=weights, dilations=(1, 2, 4))
        args.update(change)
        with pytest.raises(exc, match=match):
            streaming_conv1d_stack(x, args["states"], args["weights"], biases, dilations=args["dilations"], groups=8,
                                   activation="gelu", residual=True)
        for s, b in zip(states, before):
            assert torch.equal(s, b), change
    x2, st2, w2, b2 = _stack(torch.float32, 2, (4, 6, 6), (3, 3), (1, 1), (1, 1), 3)
    with pytest.raises(ValueError, match="layer 0 maps 4 channels to 6"):
        streaming_conv1d_stack(x2, st2, w2, b2, dilations=(1, 1), residual=True)


def test_gradients_match_the_reference():
    x, states, weights, biases = _stack(torch.float64, 2, (6, 6, 6), (3, 2), (1, 3), (6, 1), 7)
    ref_states = [s.clone() for s in states]
    leaves = [t.requires_grad_() for t in [x, *weights, biases[0]]]
    got = streaming_conv1d_stack(x, states, weights, biases, dilations=(1, 3), groups=[6, 1], activation="silu",
                                 residual=True)
    grads = torch.autograd.grad(got.square().sum(), leaves)
    want = ref.streaming_conv1d_stack(x, ref_states, weights, biases, dilations=(1, 3), groups=[6, 1],
                                      activation="silu", residual=True)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for s, t in zip(states, ref_states):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["ones", "primes", "long", "mixed"])
def test_streaming_tcn_equals_offline(kind, dtype):
    torch.manual_seed(0)
    tcn = TCN(8, kernel_size=3, num_layers=6, activation="gelu").requires_grad_(False).to(dtype)
    x = torch.randn(2, 8, 400).to(dtype)
    want = tcn(x)
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    stream = StreamingTCN(tcn)
    outs = []
    for _ in range(2):  # reset restores the initial state
        stream.reset(2)
        outs, t = [], 0
        for h in chunk_lengths(kind, x.shape[-1], tcn.receptive_field, seed=3):
            outs.append(stream.step(x[..., t:t + h]))
            t += h
        torch.testing.assert_close(torch.cat(outs, dim=-1), want, rtol=tol, atol=tol)


def test_streaming_tcn_module_behaviour():
    torch.manual_seed(1)
    tcn = TCN(4, kernel_size=2, num_layers=3, activation="silu").requires_grad_(False)
    x = torch.randn(4, 50)
    stream = StreamingTCN.from_module(tcn)
    got = torch.cat([stream.step(x[:, :20]), stream.step(x[:, 20:])], dim=-1)  # unbatched, reset on first use
    torch.testing.assert_close(got, tcn(x[None])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch size 3.*reset\\(3\\)"):
        stream.step(torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="streaming_conv1d_stack: layer 0: .*C_in=5"):
        stream.step(torch.randn(5, 2))
    with pytest.raises(ValueError, match="reset: batch_size"):
        stream.reset(-1)
    # .to() replaces the buffers and parameters: the step follows them
    s64 = copy.deepcopy(stream).to(torch.float64)
    s64.reset(1)
    torch.testing.assert_close(s64.step(x.double()), tcn.double()(x.double()[None])[0], rtol=1e-10, atol=1e-10)
    assert "num_layers=3" in repr(stream)


def test_streaming_tcn_compiles_fullgraph():
    torch.manual_seed(2)
    tcn = TCN(8, kernel_size=3, num_layers=4, activation="gelu").requires_grad_(False)
    eager, compiled_stream = StreamingTCN(tcn), StreamingTCN(tcn)
    eager.reset(2)
    compiled_stream.reset(2)
    step = torch.compile(compiled_stream.step, fullgraph=True)
    x = torch.randn(2, 8, 30)
    with torch.no_grad():
        for t in range(0, 30, 5):
            torch.testing.assert_close(step(x[..., t:t + 5]), eager.step(x[..., t:t + 5]), rtol=1e-6, atol=1e-6)
    for a, b in zip(eager._states, compiled_stream._states):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
