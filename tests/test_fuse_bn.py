"""accel.patch(model, fuse_bn=True): BatchNorm folding into the convolution before it."""
import pytest
import torch
from torch import nn

import accel
from accel.nn import DilatedConv1d


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def test_folds_conv_bn_pairs_and_unpatches():
    model = _randomise(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)))).eval()
    originals = list(model.modules())
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        want = model(x)
        report = accel.patch(model, fuse_bn=True)
        got = model(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    folded = [(e.path, e.original, e.new) for e in report.replaced if e.rule == "fuse_bn"]
    assert folded == [("0", "Conv2d", "Conv2d"), ("1", "BatchNorm2d", "Identity"),
                      ("3.0", "Conv2d", "Conv2d"), ("3.1", "BatchNorm2d", "Identity")]
    assert isinstance(model[1], nn.Identity) and model[3][0].bias is not None
    assert accel.unpatch(model) == 4
    assert list(model.modules()) == originals  # the same objects, not copies
    assert model[3][0].bias is None
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_without_fuse_bn_nothing_is_folded():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    report = accel.patch(model)
    assert not [e for e in report.replaced if e.rule == "fuse_bn"]
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize("build, why", [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "training mode"),
    (lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)).eval(), "follows a ReLU"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)).eval(),
     "no running statistics"),
])
def test_skips_with_a_reason(build, why):
    model = build()
    report = accel.patch(model, fuse_bn=True)
    assert any(s.path == "1" and why in s.reason for s in report.skipped), report
    assert isinstance(model[1], nn.modules.batchnorm._BatchNorm)


def test_shared_conv_is_not_folded():
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(3), conv).eval()
    report = accel.patch(model, fuse_bn=True)
    assert any("also used elsewhere" in s.reason for s in report.skipped)
    assert model[0] is conv


def test_folded_conv1d_still_becomes_accels():
    model = _randomise(nn.Sequential(nn.Conv1d(6, 6, 3, dilation=2, padding=2, groups=6), nn.BatchNorm1d(6))).eval()
    x = torch.randn(2, 6, 31)
    with torch.no_grad():
        want = model(x)
        report = accel.patch(model, fuse_bn=True)
        got = model(x)
    assert isinstance(model[0], DilatedConv1d), report
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    accel.unpatch(model)
    assert isinstance(model[0], nn.Conv1d) and isinstance(model[1], nn.BatchNorm1d)
    with torch.no_grad():
        assert torch.allclose(model(x), want)
