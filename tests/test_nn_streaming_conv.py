"""accel.nn.StreamingConv1d: chunk-by-chunk outputs equal the offline convolution of the whole signal."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accel.nn import TCN, DilatedConv1d, StreamingConv1d

from streaming_chunks import chunk_lengths  # tests/ is on sys.path (pytest rootdir-based import)


def stream(m: StreamingConv1d, x: torch.Tensor, lengths) -> torch.Tensor:
    """The stream's outputs from a reset, aligned with the offline ones (first ``delay`` dropped,
    the flush appended)."""
    m.reset(x.shape[0])
    outs, t = [], 0
    with torch.no_grad():
        for h in lengths:
            outs.append(m.step(x[..., t:t + h]))
            t += h
        outs.append(m.flush())
    return torch.cat(outs, dim=-1)[..., m.delay:]


def make_conv(kind, c_in, c_out, k, *, stride=1, padding=0, dilation=1, groups=1, activation=None, seed=0):
    torch.manual_seed(seed)
    if kind == "nn":
        return nn.Conv1d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return DilatedConv1d(c_in, c_out, k, padding=padding, dilation=dilation, groups=groups, activation=activation)


# (offline module kind, C_in, C_out, K, options): causal, look-ahead and strided configurations
CONFIGS = {
    "causal depthwise d1": ("dilated", 4, 4, 3, dict(padding="causal", groups=4, activation="gelu")),
    "causal depthwise d64": ("dilated", 4, 4, 3, dict(padding="causal", dilation=64, groups=4, activation="silu")),
    "causal depthwise C16 K4 (decode shape)": ("dilated", 16, 16, 4, dict(padding="causal", groups=16,
                                                                         activation="silu")),
    "causal dense K2 d7": ("dilated", 3, 5, 2, dict(padding="causal", dilation=7, activation="relu")),
    "conv1d padding=span (causal trick)": ("nn", 4, 6, 3, dict(padding=8, dilation=4, groups=2)),
    "same K5 d3 (look-ahead 6)": ("nn", 4, 6, 5, dict(padding="same", dilation=3)),
    "dilated same K4 d5 (odd span)": ("dilated", 6, 6, 4, dict(padding="same", dilation=5, groups=6)),
    "symmetric p2 K5 d3 stride3": ("nn", 4, 6, 5, dict(stride=3, padding=2, dilation=3)),
    "valid K4 d2 stride4": ("nn", 4, 6, 4, dict(stride=4, dilation=2)),
    "K1 stride2": ("nn", 4, 3, 1, dict(stride=2)),
    "valid K3 d16 stride2 dense": ("nn", 3, 2, 3, dict(stride=2, dilation=16)),
}


@pytest.mark.parametrize("chunks", ["ones", "primes", "long", "mixed"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_stream_equals_offline_fp32(name, chunks):
    kind, c_in, c_out, k, opts = CONFIGS[name]
    conv = make_conv(kind, c_in, c_out, k, **opts)
    m = StreamingConv1d.from_module(conv)
    rf = m.span + 1
    L = max(150, 2 * rf + 31) if chunks != "ones" else max(120, rf + 23)
    x = torch.randn(3, c_in, L)
    with torch.no_grad():
        want = conv(x)
    got = stream(m, x, chunk_lengths(chunks, L, rf, seed=len(name)))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["causal depthwise d64", "same K5 d3 (look-ahead 6)", "symmetric p2 K5 d3 stride3"])
def test_stream_equals_offline_bf16(name):
    kind, c_in, c_out, k, opts = CONFIGS[name]
    conv = make_conv(kind, c_in, c_out, k, **opts).to(torch.bfloat16)
    m = StreamingConv1d.from_module(conv)
    x = torch.randn(2, c_in, 300).to(torch.bfloat16)
    with torch.no_grad():
        want = copy.deepcopy(conv).float()(x.float())  # fp32 oracle on the same bf16 values
    got = stream(m, x, chunk_lengths("mixed", 300, m.span + 1, seed=3))
    assert got.dtype == torch.bfloat16 and m.state.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_delay_and_lookahead_attributes():
    assert StreamingConv1d(4, 4, 3, dilation=4).delay == 0  # padding="causal" by default
    same = StreamingConv1d.from_module(nn.Conv1d(4, 4, 5, padding="same", dilation=3))
    assert (same.lookahead, same.delay, same.right_padding) == (6, 6, 6)
    valid = StreamingConv1d.from_module(nn.Conv1d(4, 4, 3, dilation=2))
    assert (valid.lookahead, valid.delay, valid.right_padding) == (4, 4, 0)
    strided = StreamingConv1d.from_module(nn.Conv1d(4, 4, 5, stride=3, padding=2, dilation=3))
    assert (strided.lookahead, strided.delay) == (10, 3)  # output j is offline output j - 10 // 3


def test_lookahead_output_j_is_offline_output_j_minus_delay():
    conv = nn.Conv1d(2, 2, 5, padding="same", dilation=2)
    m = StreamingConv1d.from_module(conv)
    x = torch.randn(1, 2, 40)
    with torch.no_grad():
        want = conv(x)
        m.reset(1)
        got = torch.cat([m.step(x[..., t:t + 1]) for t in range(40)], dim=-1)
    assert m.delay == 4
    # sample j of the stream is available once input j arrived and equals offline sample j - delay
    torch.testing.assert_close(got[..., m.delay:], want[..., :40 - m.delay], atol=1e-6, rtol=1e-6)


def test_strided_chunk_output_counts_follow_the_phase():
    m = StreamingConv1d(2, 2, 3, stride=4, padding=0)  # look-ahead 2: outputs at t = 2, 6, 10, ...
    m.reset(1)
    with torch.no_grad():
        counts = [m.step(torch.randn(1, 2, h)).shape[-1] for h in (1, 1, 1, 3, 4, 5, 2)]
    # chunks t = 0 | 1 | 2 | 3-5 | 6-9 | 10-14 | 15-16: outputs at t = 2, 6, 10 and 14
    assert counts == [0, 0, 1, 0, 1, 2, 0]


def test_tcn_stack_streams_like_the_offline_tcn():
    torch.manual_seed(0)
    tcn = TCN(8, kernel_size=3, num_layers=6, activation="gelu")
    layers = [StreamingConv1d.from_module(c) for c in tcn.layers]
    x = torch.randn(2, 8, 260)
    with torch.no_grad():
        want = tcn(x)
        for m in layers:
            m.reset(2)
        outs, t = [], 0
        for h in chunk_lengths("mixed", 260, tcn.receptive_field, seed=1):
            y = x[..., t:t + h]
            for m in layers:
                y = m.step(y, residual=y)
            outs.append(y)
            t += h
    torch.testing.assert_close(torch.cat(outs, dim=-1), want, atol=1e-5, rtol=1e-5)


def test_reset_restores_the_initial_state():
    m = StreamingConv1d(3, 3, 3, dilation=5, groups=3, activation="silu")
    x = torch.randn(2, 3, 50)
    with torch.no_grad():
        first = m.step(x)  # before any reset: resets to the chunk's batch size
        assert m.state.shape == (2, 3, 10) and m.state.abs().sum() > 0
        m.step(torch.randn(2, 3, 7))
        m.reset(2)
        assert torch.equal(m.state, torch.zeros(2, 3, 10))
        torch.testing.assert_close(m.step(x), first, atol=0, rtol=0)
        m.reset(5)  # a new batch of streams
        assert m.state.shape == (5, 3, 10)
        assert m.step(torch.randn(5, 3, 4)).shape == (5, 3, 4)


def test_reset_resets_the_stride_phase():
    m = StreamingConv1d(2, 2, 2, stride=3)
    x = torch.randn(1, 2, 9)
    with torch.no_grad():
        m.reset(1)
        a = m.step(x)
        m.step(torch.randn(1, 2, 2))
        m.reset(1)
        b = m.step(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert a.shape[-1] == 3


def test_state_follows_the_weight_dtype_and_device():
    m = StreamingConv1d(2, 2, 3).double()
    m.reset(4)
    assert m.state.dtype == torch.float64 and m.state.device == m.weight.device


def test_from_module_shares_parameters_and_state_dict_keys():
    for conv in (nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2),
                 DilatedConv1d(4, 4, 3, padding="causal", dilation=4, groups=4, activation="gelu"),
                 nn.Conv1d(4, 4, 3, bias=False)):
        m = StreamingConv1d.from_module(conv)
        assert m.weight is conv.weight and m.bias is conv.bias
        m.reset(2)
        assert list(m.state_dict()) == list(conv.state_dict())  # the state is not persistent
        assert "state" in dict(m.named_buffers())
        m.load_state_dict(conv.state_dict())
    assert StreamingConv1d.from_module(DilatedConv1d(2, 2, 3, padding="causal", activation="gelu")).activation == "gelu"
    direct = StreamingConv1d(4, 6, 3, groups=2)
    ref = nn.Conv1d(4, 6, 3, groups=2)
    assert list(direct.state_dict()) == list(ref.state_dict())
    assert [v.shape for v in direct.state_dict().values()] == [v.shape for v in ref.state_dict().values()]


def test_extra_repr():
    r = repr(StreamingConv1d.from_module(nn.Conv1d(4, 4, 5, stride=2, padding=2, groups=4, bias=False)))
    assert "kernel_size=5" in r and "stride=2" in r and "groups=4" in r and "bias=False" in r and "delay=1" in r
    assert "activation='silu'" in repr(StreamingConv1d(2, 2, 3, activation="silu"))


@pytest.mark.parametrize("make", [
    lambda: DilatedConv1d(3, 3, 3, padding="causal", dilation=2, groups=3, activation="gelu"),
    lambda: nn.Conv1d(3, 4, 3, padding="same", dilation=2),
])
def test_gradient_of_one_chunk_matches_offline(make):
    torch.manual_seed(0)
    conv = make().double()
    m = StreamingConv1d.from_module(conv)
    x = torch.randn(2, 3, 30, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, conv.out_channels, 30 - m.delay, dtype=torch.float64)
    m.reset(2)
    # from a reset, one chunk's outputs after the delay are offline outputs that read no right padding
    got = torch.autograd.grad(m.step(x)[..., m.delay:], [x, conv.weight, conv.bias], g)
    want = torch.autograd.grad(conv(x)[..., :30 - m.delay], [x, conv.weight, conv.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bad_chunks_raise_before_the_state_changes():
    m = StreamingConv1d(4, 4, 3, dilation=2, groups=4)
    m.reset(2)
    with torch.no_grad():
        m.step(torch.randn(2, 4, 5))
    before = m.state.clone()
    with pytest.raises(ValueError, match="chunk.*in_channels=4"):
        m.step(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="chunk.*dtype"):
        m.step(torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk.*batch size 3.*reset"):
        m.step(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="chunk must be"):
        m.step(torch.randn(4))
    with pytest.raises(TypeError, match="chunk must be a tensor"):
        m.step([1.0, 2.0])
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        m.step(torch.randn(2, 4, 5), residual=torch.randn(2, 4, 1))
    assert torch.equal(m.state, before)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(padding_mode="reflect"), ValueError, "padding_mode='zeros' only"),
    (dict(padding=5), ValueError, "left padding 5 exceeds"),
    (dict(padding="full"), ValueError, "padding must be"),
    (dict(activation="tanh"), ValueError, "activation must be"),
    (dict(groups=3), ValueError, "groups=3 must divide"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        StreamingConv1d(4, 4, 3, **kwargs)


def test_other_errors():
    with pytest.raises(TypeError, match="from_module expects"):
        StreamingConv1d.from_module(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        StreamingConv1d(2, 2, 3).reset(-1)
    with pytest.raises(RuntimeError, match="nothing was streamed"):
        StreamingConv1d(2, 2, 3).flush()


def test_unbatched_chunks():
    m = StreamingConv1d(3, 3, 3, dilation=2, groups=3)
    x = torch.randn(3, 20)
    with torch.no_grad():
        a = torch.cat([m.step(x[:, :7]), m.step(x[:, 7:])], dim=-1)
    want = F.conv1d(F.pad(x.unsqueeze(0), (4, 0)), m.weight, m.bias, dilation=2, groups=3).squeeze(0)
    torch.testing.assert_close(a, want.detach(), atol=1e-5, rtol=1e-5)
