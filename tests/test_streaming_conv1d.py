"""accel.ops.streaming_conv1d on the CPU: against the reference over a grid, streaming equals offline,
bad input, gradients, compile. (The capability examples also run through tests/test_op_contract.py.)"""
import random

import pytest
import torch
import torch.nn.functional as F

import accel.reference as ref
from accel.ops import dilated_conv1d, streaming_conv1d

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (B, C_in, C_out, groups, K, dilation, h, extra state, activation, indexed): depthwise decode (the
# hybrid models' step, with the vectorised eight-row paths from 8 or 9 channels: K <= 4, a state of
# three samples or another one of at most four), depthwise long chunks, grouped, dense (the GEMM
# path from 4 channels per group)
GRID = [
    (3, 6, 6, 6, 4, 1, 1, 0, "silu", False),
    (4, 33, 33, 33, 4, 1, 1, 1, "silu", True),
    (3, 40, 40, 40, 4, 1, 1, 0, "silu", True),
    (2, 27, 27, 27, 3, 1, 1, 0, "gelu", False),
    (2, 19, 19, 19, 2, 1, 1, 0, None, False),
    (2, 21, 21, 21, 3, 1, 1, 2, "relu", False),
    (2, 35, 35, 35, 2, 1, 1, 2, "silu", True),
    (3, 64, 64, 64, 3, 1, 1, 1, "gelu", False),
    (2, 17, 17, 17, 2, 1, 1, 3, "relu", False),
    (2, 5, 5, 5, 3, 4, 7, 0, None, False),
    (2, 7, 7, 7, 5, 3, 129, 2, "gelu", True),
    (2, 300, 300, 300, 2, 64, 1, 0, None, False),
    (3, 4, 6, 2, 2, 3, 13, 0, "gelu", True),
    (2, 3, 5, 1, 3, 5, 2, 0, "relu", False),
    (2, 9, 8, 1, 3, 2, 37, 0, "relu", False),
    (2, 16, 16, 1, 3, 64, 300, 5, "silu", True),
    (1, 12, 20, 4, 3, 2, 3, 0, None, False),
    (2, 24, 24, 3, 7, 1, 200, 0, "silu", False),
    (1, 8, 8, 1, 1, 1, 5, 0, None, False),
]


def _inputs(dtype, B, cin, cout, groups, K, d, h, extra, indexed, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = B + 3 if indexed else B
    x = torch.randn(B, cin, h, generator=g).to(dtype)
    state = torch.randn(slots, cin, (K - 1) * d + extra, generator=g).to(dtype)
    w = (torch.randn(cout, cin // groups, K, generator=g) / (cin // groups * K) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype)
    idx = None
    if indexed:
        idx = torch.randperm(slots, generator=g)[:B].to(torch.int32)
        idx[B // 2] = -1
    return x, state, w, b, idx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GRID, ids=lambda c: "B{}-C{}-{}-g{}-K{}-d{}-h{}-x{}-{}-{}".format(*c))
def test_matches_reference(dtype, case):
    B, cin, cout, groups, K, d, h, extra, act, indexed = case
    x, state, w, b, idx = _inputs(dtype, B, cin, cout, groups, K, d, h, extra, indexed)
    want_state = state.clone()
    # the reference in float64 (bf16/fp16 values are exact in it), rounded once at the end
    want = ref.streaming_conv1d(x.double(), want_state_64 := want_state.double(), w.double(), b.double(),
                                dilation=d, groups=groups, activation=act, state_indices=idx)
    got = streaming_conv1d(x, state, w, b, dilation=d, groups=groups, activation=act, state_indices=idx)
    assert got.dtype == dtype and got.shape == (B, cout, h)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(state, want_state_64.to(dtype)), "the state is a copy of the samples, exactly"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("groups,cin,cout,K,d", [(64, 64, 64, 4, 1), (1, 8, 8, 3, 64), (2, 6, 10, 5, 7)])
def test_streaming_equals_offline(dtype, tol, groups, cin, cout, K, d):
    """Random chunk lengths (1, primes, longer than the receptive field, mixed) give, concatenated, the
    causal convolution of the whole signal."""
    rng = random.Random(cin * K + d)
    torch.manual_seed(d)
    B, L = 3, 1100
    x = torch.randn(B, cin, L).to(dtype)
    w = (torch.randn(cout, cin // groups, K) / (cin // groups * K) ** 0.5).to(dtype)
    b = torch.randn(cout).to(dtype)
    offline = F.silu(F.conv1d(F.pad(x.double(), ((K - 1) * d, 0)), w.double(), b.double(), dilation=d,
                              groups=groups))
    state = torch.zeros(B, cin, (K - 1) * d, dtype=dtype)
    outs, t = [], 0
    lengths = [1, 1, 2, 3, 5, 7, 13, 1, 31, (K - 1) * d + 5, 97, 1, 257]
    while t < L:
        h = min(L - t, lengths[len(outs)] if len(outs) < len(lengths) else rng.choice([1, 2, 3, 17, 61, 200]))
        outs.append(streaming_conv1d(x[..., t:t + h], state, w, b, groups=groups, dilation=d, activation="silu"))
        t += h
    torch.testing.assert_close(torch.cat(outs, -1).double(), offline, rtol=tol, atol=tol)
    torch.testing.assert_close(state, x[..., L - (K - 1) * d:], rtol=0, atol=0)


def test_padding_rows_and_slots():
    x, state, w, b, _ = _inputs(torch.float32, 4, 5, 5, 5, 3, 2, 1, 0, False)
    state = torch.randn(6, 5, 4)
    before = state.clone()
    idx = torch.tensor([4, -1, 0, 2], dtype=torch.int32)
    y = streaming_conv1d(x, state, w, b, groups=5, dilation=2, state_indices=idx)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    for slot in (1, 3, 5):  # slots no row names are untouched
        assert torch.equal(state[slot], before[slot])
    assert torch.equal(state[4, :, -1], x[0, :, 0]) and torch.equal(state[4, :, :-1], before[4, :, 1:])


def test_chunk_views_and_empty_chunk():
    # a decode step's (B, C, 1) view of a (B, 1, C) tensor, and a channels-last chunk
    w = torch.randn(32, 1, 4)
    for x in (torch.randn(4, 1, 32).transpose(1, 2), torch.randn(4, 9, 32).transpose(1, 2)):
        s1, s2 = torch.randn(4, 32, 3), None
        s2 = s1.clone()
        torch.testing.assert_close(streaming_conv1d(x, s1, w, groups=32), ref.streaming_conv1d(x, s2, w, groups=32))
        assert torch.equal(s1, s2)
    state = torch.randn(2, 3, 2)
    before = state.clone()
    y = streaming_conv1d(torch.randn(2, 3, 0), state, torch.randn(4, 3, 3))
    assert y.shape == (2, 4, 0) and torch.equal(state, before)


def test_fp64_stays_fp64():
    x, state, w, b, _ = _inputs(torch.float64, 2, 4, 4, 1, 3, 1, 9, 0, False)
    assert streaming_conv1d(x, state, w, b).dtype == torch.float64


# --------------------------------------------------------------------------- bad input

def _good():
    return dict(x=torch.randn(2, 4, 5), state=torch.randn(3, 4, 4), weight=torch.randn(4, 2, 3), bias=torch.randn(4),
                dilation=2, groups=2, activation="silu", state_indices=torch.tensor([2, 0], dtype=torch.int32))


BAD = [
    ("state shape", dict(state=torch.randn(3, 5, 4)), ValueError, "state must have shape"),
    ("state too short", dict(state=torch.randn(3, 4, 3)), ValueError, "at least \\(K-1\\)\\*dilation = 4"),
    ("state dtype", dict(state=torch.randn(3, 4, 4, dtype=torch.float64)), TypeError, "state has dtype"),
    ("state not contiguous", dict(state=torch.randn(3, 4, 8)[..., ::2]), ValueError, "state must be contiguous"),
    ("state 2-D", dict(state=torch.randn(3, 16)), ValueError, "state must be 3-D"),
    ("chunk channels", dict(x=torch.randn(2, 6, 5)), ValueError, "C_in"),
    ("weight shape", dict(weight=torch.randn(4, 4, 3)), ValueError, "weight must have shape"),
    ("groups", dict(groups=3), ValueError, "groups=3 must divide"),
    ("dilation", dict(dilation=0), ValueError, "dilation must be >= 1"),
    ("activation", dict(activation="tanh"), ValueError, "activation must be one of"),
    ("index out of range", dict(state_indices=torch.tensor([3, 0], dtype=torch.int32)), ValueError,
     "state_indices\\[0\\] = 3 is outside \\[-1, 3\\)"),
    ("index below -1", dict(state_indices=torch.tensor([0, -2], dtype=torch.int32)), ValueError, "outside"),
    ("index twice", dict(state_indices=torch.tensor([1, 1], dtype=torch.int32)), ValueError, "both name slot 1"),
    ("index dtype", dict(state_indices=torch.tensor([1, 0])), TypeError, "state_indices must be int32"),
    ("index shape", dict(state_indices=torch.tensor([1, 0, 2], dtype=torch.int32)), ValueError, "shape \\(B,\\)"),
    ("no indices, slots != rows", dict(state_indices=None), ValueError, "one slot per row"),
    ("bias shape", dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    ("x not a tensor", dict(x=[1.0]), TypeError, "x must be a tensor"),
    ("groups a float", dict(groups=2.0), TypeError, "groups must be an int"),
]


@pytest.mark.parametrize("what,change,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_state_untouched(what, change, error, match):
    args = {**_good(), **change}
    state = args["state"]
    before = state.clone()
    with pytest.raises(error, match=f"streaming_conv1d: .*{match}"):
        streaming_conv1d(args.pop("x"), args.pop("state"), args.pop("weight"), args.pop("bias"), **args)
    assert torch.equal(state, before), "a refused call must leave the state as it was"


def test_bad_input_is_refused_with_grad_too():
    args = _good()
    state = args["state"]
    before = state.clone()
    x = args.pop("x").requires_grad_()
    with pytest.raises(ValueError, match="outside"):
        streaming_conv1d(x, args.pop("state"), args.pop("weight"), args.pop("bias"),
                         **{**args, "state_indices": torch.tensor([7, 0], dtype=torch.int32)})
    assert torch.equal(state, before)


# --------------------------------------------------------------------------- gradients and compile

@pytest.mark.parametrize("indexed", [False, True])
def test_gradients_truncated_history(indexed):
    x, state, w, b, idx = _inputs(torch.float64, 3, 6, 4, 2, 3, 2, 11, 1, indexed)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()

    def fn(x, w, b):
        return streaming_conv1d(x, state.clone(), w, b, dilation=2, groups=2, activation="gelu", state_indices=idx)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    ours = torch.autograd.grad(fn(x, w, b).sum(), (x, w, b))
    theirs = torch.autograd.grad(ref.streaming_conv1d(x, state.clone(), w, b, dilation=2, groups=2, activation="gelu",
                                                      state_indices=idx).sum(), (x, w, b))
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)
    # the state advanced as without autograd
    s1, s2 = state.clone(), state.clone()
    fn_state = streaming_conv1d(x, s1, w, b, dilation=2, groups=2, state_indices=idx)
    with torch.no_grad():
        streaming_conv1d(x, s2, w, b, dilation=2, groups=2, state_indices=idx)
    assert fn_state.requires_grad and torch.equal(s1, s2)


def test_decode_loop_compiles_fullgraph():
    torch._dynamo.reset()
    w, b = torch.randn(16, 1, 4), torch.randn(16)

    def step(x, state):
        return streaming_conv1d(x, state, w, b, groups=16, activation="silu")

    compiled = torch.compile(step, fullgraph=True)
    s_eager, s_comp = torch.zeros(2, 16, 3), torch.zeros(2, 16, 3)
    for _ in range(5):
        x = torch.randn(2, 16, 1)
        torch.testing.assert_close(compiled(x, s_comp), step(x, s_eager))
        torch.testing.assert_close(s_comp, s_eager)


def test_matches_dilated_conv_on_a_zero_state():
    """A zero state is causal padding: the first chunk equals accel's own causal convolution."""
    x, w, b = torch.randn(2, 8, 50), torch.randn(8, 2, 5), torch.randn(8)
    y = streaming_conv1d(x, torch.zeros(2, 8, 12), w, b, dilation=3, groups=4, activation="relu")
    torch.testing.assert_close(y, dilated_conv1d(x, w, b, dilation=3, groups=4, activation="relu"))


# --------------------------------------------------------------------------- memory safety, aliasing

def _guarded_state(shape, dtype):
    """A tensor that ends where an inaccessible page begins: a read past its end crashes the process."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    pages = (nbytes + page - 1) // page + 1
    buf = mmap.mmap(-1, pages * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(addr + (pages - 1) * page, page, 0) == 0
    t = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=(pages - 1) * page - nbytes).view(dtype)
    return t.view(shape), buf


_GUARD_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_streaming_conv1d import _guarded_state
import accel.reference as ref
from accel.ops import streaming_conv1d
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for C in (9, 10, 11, 17, 25, 265):
        for K, ls in ((2, 1), (3, 2), (4, 3), (4, 4), (2, 4), (3, 3), (2, 3), (3, 4)):
            state, keep = _guarded_state((1, C, ls), dtype)
            state.copy_(torch.randn(1, C, ls))
            w = torch.randn(C, 1, K).to(dtype)[-C:]
            x = torch.randn(1, C, 1).to(dtype)
            want_state = state.double().clone()
            want = ref.streaming_conv1d(x.double(), want_state, w.double(), groups=C)
            got = streaming_conv1d(x, state, w, groups=C)
            assert (got.double() - want).abs().max() < 5e-2, (dtype, C, K, ls)
            assert torch.equal(state.double(), want_state), (dtype, C, K, ls)
print("ok")
"""


def test_one_sample_step_reads_nothing_past_the_state():
    """The vectorised decode step loads four samples from each row start: the last slot's state ends at an
    inaccessible page, so a load past it would crash (run in a child process)."""
    import pathlib
    import subprocess
    import sys

    tests = str(pathlib.Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT.format(tests=tests)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_inputs_sharing_memory_with_the_state_are_refused():
    state = torch.randn(1, 9, 4)
    before = state.clone()
    for x in (state[:, :, 1:], state[:, :, 3:]):
        with pytest.raises(ValueError, match="x shares memory with state"):
            streaming_conv1d(x, state, torch.randn(9, 1, 4), groups=9)
    assert torch.equal(state, before)


def test_direct_op_call_has_no_silent_backward():
    x = torch.randn(2, 4, 3, requires_grad=True)
    y = torch.ops.accel.streaming_conv1d(x, torch.randn(2, 4, 2), torch.randn(4, 1, 3), None, 1, 4, "none", None)
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


def test_empty_chunk_and_all_padding_with_autograd():
    w = torch.randn(4, 1, 3, requires_grad=True)
    state = torch.randn(2, 4, 2)
    before = state.clone()
    assert streaming_conv1d(torch.randn(2, 4, 0, requires_grad=True), state, w, groups=4).shape == (2, 4, 0)
    assert torch.equal(state, before)
    none = torch.tensor([-1, -1], dtype=torch.int32)
    y = streaming_conv1d(torch.randn(2, 4, 3, requires_grad=True), torch.randn(0, 4, 2), w, groups=4, state_indices=none)
    assert torch.equal(y, torch.zeros_like(y))
