"""accel.streaming.sliding_windows: per-window inference on overlapping windows computed by streaming."""
import math

import pytest
import torch
from torch import nn

from accel.nn import DilatedConv1d
from accel.streaming import SlidingWindows, nrmse, sliding_windows


def same_model(c_in=2, c_out=3):
    """'same'-padded, stride 1: Conv1d(padding='same'), DilatedConv1d('same'), symmetric int padding."""
    return nn.Sequential(
        nn.Conv1d(c_in, 8, 5, padding="same"), nn.ReLU(),
        DilatedConv1d(8, 8, 3, padding="same", dilation=2), nn.Tanh(),
        nn.Conv1d(8, c_out, 3, padding=1),
    )


def pooled_model(c_in=2, c_out=3):
    """Total stride 4: two pooling layers between 'same' convolutions."""
    return nn.Sequential(
        nn.Conv1d(c_in, 8, 5, padding=2), nn.GELU(), nn.MaxPool1d(2),
        DilatedConv1d(8, 8, 3, padding="same", dilation=2), nn.ReLU(), nn.AvgPool1d(2),
        nn.Conv1d(8, c_out, 3, padding="same"),
    )


def build(factory, seed=0):
    torch.manual_seed(seed)
    return factory().eval()


def smooth_signal(b=2, c=2, n=640, seed=1):
    """A smooth test signal: a few random sinusoids plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float32)
    f = 0.002 + 0.02 * torch.rand(b, c, 4, 1, generator=g)
    ph = 2 * math.pi * torch.rand(b, c, 4, 1, generator=g)
    x = torch.sin(2 * math.pi * f * t + ph).sum(2)
    return x + 0.05 * torch.randn(b, c, n, generator=g)


def windows_of(sw: SlidingWindows, x):
    """(window_start, streamed output) for every window returned while streaming x hop by hop."""
    sw.reset(x.shape[0])
    out = []
    for t in range(0, x.shape[-1] - sw.hop + 1, sw.hop):
        y = sw.step(x[..., t:t + sw.hop])
        if y is not None:
            out.append((sw.window_start, y))
    return out


@pytest.mark.parametrize("factory,window,hop", [(same_model, 64, 16), (same_model, 48, 1), (pooled_model, 64, 8),
                                                 (pooled_model, 128, 32)])
def test_interior_equals_per_window(factory, window, hop):
    model = build(factory)
    sw = sliding_windows(model, window, hop)
    x = smooth_signal(n=window + max(4 * hop, 24) + 16)
    wins = windows_of(sw, x)
    assert len(wins) >= 3
    e, n_out = sw.edge, window // sw.stride
    assert 0 < e and 2 * e < n_out
    starts = [s for s, _ in wins]
    assert all(s % hop == 0 for s in starts)
    assert all(b - a == hop for a, b in zip(starts, starts[1:]))  # one window per hop, none skipped
    assert sw.latency % hop == 0 and sw.latency >= sw.delay * sw.stride
    for start, y in wins:
        ref = sw.per_window(x, start)
        assert y.shape == ref.shape == (2, 3, n_out)
        torch.testing.assert_close(y[..., e:n_out - e], ref[..., e:n_out - e], atol=1e-5, rtol=1e-5)
    # the first window starts with the signal: its left edge sees zeros in both, so it matches too
    start, y = wins[0]
    assert start == 0
    ref = sw.per_window(x, 0)
    torch.testing.assert_close(y[..., :n_out - e], ref[..., :n_out - e], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", [same_model, pooled_model])
def test_deviation_reported_and_small(factory):
    model = build(factory)
    sw = sliding_windows(model, 256, 32)
    d = sw.deviation(smooth_signal(n=768))
    assert d.windows == (768 - 256 - d.latency) // 32 + 1
    assert d.edge == sw.edge and d.edge_fraction == pytest.approx(2 * sw.edge / (256 // sw.stride))
    assert d.nrmse_interior < 1e-6 and d.max_abs_interior < 1e-5  # exact away from the edges
    assert 0 < d.nrmse < 0.1  # the zero-padding boundary effect: real, but small for a wide window
    assert d.max_abs > d.max_abs_interior
    # the deviation comes only from the 2 * edge outputs per window
    assert d.nrmse <= math.sqrt(d.edge_fraction) * d.max_abs / _range(sw, smooth_signal(n=768)) + 1e-9


def _range(sw, x):
    refs = torch.stack([sw.per_window(x, s) for s, _ in windows_of(sw, x)])
    return (refs.max() - refs.min()).item()


def test_deviation_shrinks_with_window():
    model = build(same_model)
    x = smooth_signal(n=700)
    small = sliding_windows(model, 64, 32).deviation(x).nrmse
    large = sliding_windows(model, 384, 32).deviation(x).nrmse
    assert large < small


def test_head_pooled_output():
    model = build(pooled_model)
    sw = sliding_windows(model, 128, 16, head=lambda y: y.mean(-1))
    x = smooth_signal(n=400)
    wins = windows_of(sw, x)
    assert wins and wins[-1][1].shape == (2, 3)
    d = sw.deviation(x)
    assert math.isnan(d.nrmse_interior)
    assert 0 < d.nrmse < 0.1


def test_nrmse_definition():
    ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert nrmse(ref, ref) == 0.0
    assert nrmse(ref, ref + 0.3) == pytest.approx(0.1)
    assert nrmse(torch.ones(3), torch.zeros(3)) == math.inf


def test_refuses_bad_window_hop():
    model = build(pooled_model)  # stride 4
    with pytest.raises(ValueError, match="multiple of hop"):
        sliding_windows(model, 100, 16)
    with pytest.raises(ValueError, match="total stride"):
        sliding_windows(model, 60, 6)
    with pytest.raises(ValueError, match="total stride"):
        sliding_windows(model, 64, 2)
    for w, h in ((0, 1), (64, 0), (64.0, 16), (64, -16)):
        with pytest.raises(ValueError, match="positive int"):
            sliding_windows(model, w, h)


def test_refuses_non_per_sample_models():
    torch.manual_seed(0)
    valid = nn.Sequential(nn.Conv1d(2, 3, 5)).eval()  # 'valid' padding: window - 4 outputs
    with pytest.raises(ValueError, match="per-sample output"):
        sliding_windows(valid, 64, 16)
    pooled = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.AdaptiveAvgPool1d(1)).eval()
    with pytest.raises(ValueError, match="adaptive"):  # use head= for a pooled output instead
        sliding_windows(pooled, 64, 16)


def test_step_checks_chunk():
    sw = sliding_windows(build(same_model), 64, 16)
    sw.reset(2)
    with pytest.raises(ValueError, match="hop=16"):
        sw.step(torch.zeros(2, 2, 8))
    with pytest.raises(ValueError, match="batch size"):
        sw.step(torch.zeros(3, 2, 16))


def test_reset():
    model = build(pooled_model)
    x, z = smooth_signal(n=256, seed=1), smooth_signal(b=3, n=256, seed=2)
    sw = sliding_windows(model, 64, 16)
    fresh = windows_of(sliding_windows(model, 64, 16), z)
    windows_of(sw, x)  # streams x, then reset to a new batch size and stream z
    again = windows_of(sw, z)
    assert [s for s, _ in again] == [s for s, _ in fresh]
    for (_, a), (_, b) in zip(again, fresh):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    sw.reset(3)
    assert sw.window_start is None and sw.step(z[..., :16]) is None  # nothing carried over
    # deviation() leaves the object reset
    sw.deviation(x)
    assert sw.window_start is None
