"""accel.streaming.stream: a traced 1-D CNN streamed chunk by chunk equals the offline model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accel.nn import TCN, DilatedConv1d
from accel.streaming import StreamingModel, stream

from streaming_chunks import chunk_lengths  # tests/ is on sys.path (pytest rootdir-based import)


def run_stream(sm: StreamingModel, x: torch.Tensor, lengths) -> torch.Tensor:
    sm.reset(x.shape[0])
    outs, t = [], 0
    for h in lengths:
        outs.append(sm.step(x[..., t:t + h]))
        t += h
    return torch.cat(outs, dim=-1)


def check_equal(model, x, lengths):
    """Stream output j equals offline output j - delay; returns the raw stream output."""
    sm = stream(model)
    with torch.no_grad():
        want = model(x)
    got = run_stream(sm, x, lengths)
    d = sm.delay
    n = got.shape[-1] - d
    assert n > 0 and n <= want.shape[-1]
    torch.testing.assert_close(got[..., d:], want[..., :n], atol=1e-5, rtol=1e-5)
    return sm, got


# ------------------------------------------------------------------ models

class Chomp1d(nn.Module):
    def __init__(self, chomp_size):
        super().__init__()
        self.chomp_size = chomp_size

    def forward(self, x):
        return x[:, :, :-self.chomp_size].contiguous()


class TemporalBlock(nn.Module):
    """locuslab/TCN's block: (conv padded by (K-1)*d, chomp, relu, dropout) x 2, residual."""

    def __init__(self, n_in, n_out, k, dilation, dropout=0.2, norm=lambda m: m):
        super().__init__()
        p = (k - 1) * dilation
        self.conv1 = norm(nn.Conv1d(n_in, n_out, k, padding=p, dilation=dilation))
        self.chomp1 = Chomp1d(p)
        self.relu1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.conv2 = norm(nn.Conv1d(n_out, n_out, k, padding=p, dilation=dilation))
        self.chomp2 = Chomp1d(p)
        self.relu2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.net = nn.Sequential(self.conv1, self.chomp1, self.relu1, self.dropout1,
                                 self.conv2, self.chomp2, self.relu2, self.dropout2)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.net(x)
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(out + res)


class ChompTCN(nn.Module):
    def __init__(self, n_in, channels, k=3, norm=lambda m: m):
        super().__init__()
        layers = []
        for i, c in enumerate(channels):
            layers.append(TemporalBlock(n_in if i == 0 else channels[i - 1], c, k, 2 ** i, norm=norm))
        self.network = nn.Sequential(*layers)

    def forward(self, x):
        return self.network(x)


class ChannelNorm(nn.Module):
    """Cumulative-free channel norm: statistics over channels at each time step."""

    def __init__(self, c, eps=1e-8):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, c, 1) + 0.1 * torch.randn(1, c, 1))
        self.beta = nn.Parameter(0.1 * torch.randn(1, c, 1))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
        return self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta


class TransposedLayerNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x):
        return self.ln(x.transpose(1, 2)).transpose(1, 2)


class SeparationBlock(nn.Module):
    """ConvTasNet's 1-D conv block, causal: 1x1 conv, PReLU, norm, depthwise dilated conv, PReLU, norm,
    1x1 convs to the residual and skip paths."""

    def __init__(self, b, h, k, dilation, second_norm):
        super().__init__()
        self.conv1x1 = nn.Conv1d(b, h, 1)
        self.prelu1 = nn.PReLU()
        self.norm1 = ChannelNorm(h)
        self.dconv = nn.Conv1d(h, h, k, padding=(k - 1) * dilation, dilation=dilation, groups=h)
        self.chomp = (k - 1) * dilation
        self.prelu2 = nn.PReLU(h)
        self.norm2 = second_norm(h)
        self.res = nn.Conv1d(h, b, 1)
        self.skip = nn.Conv1d(h, b, 1)

    def forward(self, x):
        y = self.norm1(self.prelu1(self.conv1x1(x)))
        y = self.dconv(y)[:, :, :-self.chomp]
        y = self.norm2(self.prelu2(y))
        return x + self.res(y), self.skip(y)


class Separator(nn.Module):
    def __init__(self, n_in=6, b=8, h=12, k=3, repeats=2, blocks=3):
        super().__init__()
        self.bottleneck = nn.Conv1d(n_in, b, 1)
        self.blocks = nn.ModuleList(
            SeparationBlock(b, h, k, 2 ** i, ChannelNorm if (r + i) % 2 else TransposedLayerNorm)
            for r in range(repeats) for i in range(blocks))
        self.out = nn.Sequential(nn.PReLU(), nn.Conv1d(b, n_in, 1), nn.Sigmoid())

    def forward(self, x):
        y = self.bottleneck(x)
        skips = 0
        for blk in self.blocks:
            y, s = blk(y)
            skips = skips + s
        return self.out(skips) * x


class Strided(nn.Module):
    """Stride-2 conv with look-ahead, max pooling, and a skip branch joined after them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 5, stride=2, padding=2)
        self.pool = nn.MaxPool1d(2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv1d(6, 6, 3, padding=1)
        self.skip = nn.Conv1d(4, 6, 4, stride=4)
        self.avg = nn.AvgPool1d(2)

    def forward(self, x):
        y = self.pool(self.act(self.conv(x)))
        y = F.relu(self.conv2(y)) + self.skip(x)
        return torch.cat([self.avg(y), self.avg(y * 0.5)], dim=1)[:, 1:]


def build(name):
    torch.manual_seed(0)
    if name == "accel TCN":
        return TCN(6, kernel_size=3, num_layers=4, activation="gelu").eval(), 6
    if name == "chomp TCN":
        return ChompTCN(3, [8, 8, 6], k=3).eval(), 3
    if name == "separator":
        return Separator().eval(), 6
    if name == "strided":
        return Strided().eval(), 4
    raise KeyError(name)


MODELS = ["accel TCN", "chomp TCN", "separator", "strided"]


@pytest.mark.parametrize("chunks", ["ones", "primes", "long", "mixed"])
@pytest.mark.parametrize("name", MODELS)
def test_stream_equals_offline(name, chunks):
    model, c = build(name)
    L = 48 if chunks == "ones" else 160
    x = torch.randn(2, c, L)
    sm = stream(model)
    check_equal(model, x, chunk_lengths(chunks, L, sm.receptive_field, seed=len(name)))


@pytest.mark.parametrize("name", MODELS + ["same padding"])
def test_flush_completes_the_offline_output(name):
    if name == "same padding":
        torch.manual_seed(1)
        model, c = nn.Sequential(nn.Conv1d(3, 4, 5, padding="same"), nn.Tanh(), nn.Conv1d(4, 4, 3, padding=2),
                                 nn.Conv1d(4, 2, 3, padding=1)).eval(), 3
    else:
        model, c = build(name)
    x = torch.randn(2, c, 96)
    sm = stream(model)
    with torch.no_grad():
        want = model(x)
    got = torch.cat([run_stream(sm, x, chunk_lengths("mixed", 96, 20, seed=9)), sm.flush()], -1)[..., sm.delay:]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="reset"):
        sm.step(x[..., :4])


@pytest.mark.parametrize("L, chunks", [(197, "ones"), (211, "primes"), (250, "mixed")])
def test_deep_strided_chain_with_lookahead_phases(L, chunks):
    """Look-ahead not a multiple of the stride, pooling after delayed streams, strides compounding."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(3, 4, 5, stride=3, padding=2, dilation=3), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1),
                          nn.MaxPool1d(2), nn.Conv1d(4, 4, 5, padding="same"), nn.AvgPool1d(3),
                          nn.Conv1d(4, 2, 2, stride=2)).eval()
    x = torch.randn(2, 3, L)
    sm = stream(model)
    assert (sm.stride, sm.receptive_field) == (36, 13 + 6 + 3 + 24 + 12 + 18)
    with torch.no_grad():
        want = model(x)
    got = torch.cat([run_stream(sm, x, chunk_lengths(chunks, L, 40, seed=L)), sm.flush()], -1)[..., sm.delay:]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_receptive_field_and_delay():
    tcn, _ = build("accel TCN")
    assert stream(tcn).receptive_field == tcn.receptive_field == 1 + 2 * 15
    assert stream(tcn).delay == 0
    chomp, _ = build("chomp TCN")
    sm = stream(chomp)
    assert sm.receptive_field == 1 + 2 * 2 * (1 + 2 + 4) and sm.delay == 0 and sm.stride == 1
    strided = stream(build("strided")[0])
    assert strided.stride == 8 and strided.delay > 0


def test_strided_delay_is_honoured():
    model, c = build("strided")
    x = torch.randn(1, c, 200)
    sm, got = check_equal(model, x, chunk_lengths("mixed", 200, 30, seed=5))
    # a sample is emitted once its last input arrived: step output count is the input length / stride
    assert got.shape[-1] == 200 // sm.stride


def test_same_padding_lookahead_delay():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(3, 4, 5, padding="same"), nn.Tanh(), DilatedConv1d(4, 4, 3, padding=2, dilation=2),
                          nn.ReLU(), nn.Conv1d(4, 2, 3, padding=1))
    sm, got = check_equal(model.eval(), torch.randn(2, 3, 90), chunk_lengths("mixed", 90, 20, seed=2))
    assert sm.delay == 2 + 2 + 1 and got.shape[-1] == 90


def test_reset_restores_initial_state():
    model, c = build("separator")
    sm = stream(model)
    x = torch.randn(2, c, 70)
    lengths = chunk_lengths("primes", 70, sm.receptive_field, seed=7)
    first = run_stream(sm, x, lengths)
    run_stream(sm, torch.randn(2, c, 33), [5, 28])
    again = run_stream(sm, x, lengths)
    torch.testing.assert_close(first, again, atol=0, rtol=0)


def test_parameters_shared_and_model_unchanged():
    model, c = build("chomp TCN")
    before = copy.deepcopy(model.state_dict())
    sm = stream(model)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in sm.parameters())
    run_stream(sm, torch.randn(1, c, 40), [40])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        model.network[0].conv1.weight.mul_(2)  # the stream sees updates of the offline parameters
    check_equal(model, torch.randn(1, c, 50), [7, 43])


def test_weight_norm_chomp_tcn():
    """locuslab/TCN wraps its convolutions in weight_norm: the weight is recomputed at every step."""
    torch.manual_seed(3)
    model = ChompTCN(3, [6, 6], k=3, norm=nn.utils.parametrizations.weight_norm).eval()
    x = torch.randn(2, 3, 80)
    sm, _ = check_equal(model, x, chunk_lengths("mixed", 80, 13, seed=1))
    with torch.no_grad():
        model.network[1].conv2.parametrizations.weight.original0.mul_(3)  # g changes: the stream follows
    check_equal(model, x, [3, 77])


def test_module_called_twice():
    torch.manual_seed(4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 3, padding="same")

        def forward(self, x):
            return self.conv(torch.tanh(self.conv(x))) + x

    model = Twice().eval()
    sm, _ = check_equal(model, torch.randn(1, 3, 50), chunk_lengths("mixed", 50, 5, seed=2))
    assert sm.delay == 2 and sm.receptive_field == 5


class Flip(nn.Module):
    def forward(self, x):
        return torch.flip(x, [2])


class Mean(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=-1, keepdim=True)


class Shift(nn.Module):
    def forward(self, x):
        return x[:, :, 1:]


@pytest.mark.parametrize("model, where, why", [
    (nn.Sequential(nn.Conv1d(2, 2, 3, padding=1), nn.BatchNorm1d(2).train()), "'1'", "training mode"),
    (nn.Sequential(nn.Conv1d(2, 2, 3), nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool1d(1))), "'1.1'", "adaptive"),
    (nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect")), "'1'", "reflect"),
    (nn.Sequential(nn.Conv1d(2, 2, 3), nn.Sequential(nn.Identity(), Flip())), "'1.1'", "torch.flip"),
    (nn.Sequential(nn.Conv1d(2, 2, 3, padding=4)), "'0'", "padding"),
    (nn.Sequential(nn.Conv1d(2, 2, 3), Mean()), "'1'", "reduces over the time"),
    (nn.Sequential(nn.Conv1d(2, 2, 3), Shift()), "'1'", "slices the time"),
    (nn.Sequential(nn.Conv1d(2, 2, 3), nn.GroupNorm(1, 2)), "'1'", "GroupNorm"),
    (nn.Sequential(nn.MaxPool1d(3, stride=2)), "'0'", "kernel_size == stride"),
])
def test_refusals_name_the_module(model, where, why):
    with pytest.raises(ValueError) as e:
        stream(model)
    assert where in str(e.value) and why in str(e.value)


def test_batchnorm_eval_streams():
    torch.manual_seed(2)
    bn = nn.BatchNorm1d(4)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=2), bn, nn.SiLU()).eval()
    check_equal(model, torch.randn(2, 2, 40), chunk_lengths("primes", 40, 3))


def test_a_tcn_streams_as_one_stack_call():
    """accel.nn.TCN, as the model or inside one, becomes one StreamingTCN (one native call per step)."""
    from accel.nn import StreamingTCN

    tcn, c = build("accel TCN")
    for model in (tcn, nn.Sequential(nn.Conv1d(c, c, 1), tcn, nn.ReLU())):
        sm = stream(model.eval())
        assert [type(m) for m in sm.convs.values()].count(StreamingTCN) == 1
        x = torch.randn(2, c, 120)
        got = run_stream(sm, x, chunk_lengths("mixed", 120, 40, seed=1))
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
