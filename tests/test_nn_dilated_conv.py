"""accel.nn.DilatedConv1d and accel.nn.TCN."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accel.nn import TCN, DilatedConv1d
from accel.reference import dilated_conv1d as reference


def test_same_state_dict_keys_and_constructor_as_conv1d():
    torch.manual_seed(0)
    ref = nn.Conv1d(8, 16, 3, padding=2, dilation=2, groups=4)
    mine = DilatedConv1d(8, 16, 3, padding=2, dilation=2, groups=4)
    assert list(mine.state_dict()) == list(ref.state_dict())
    assert [v.shape for v in mine.state_dict().values()] == [v.shape for v in ref.state_dict().values()]
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 50)
    torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=1e-5)
    assert isinstance(mine, nn.Conv1d)


def test_from_module_shares_parameters():
    conv = nn.Conv1d(6, 6, 5, padding="same", dilation=4, groups=6)
    mine = DilatedConv1d.from_module(conv)
    assert mine.weight is conv.weight and mine.bias is conv.bias
    assert mine.weight.data_ptr() == conv.weight.data_ptr()
    x = torch.randn(2, 6, 101)
    torch.testing.assert_close(mine(x), conv(x), atol=1e-5, rtol=1e-5)
    no_bias = DilatedConv1d.from_module(nn.Conv1d(4, 4, 3, bias=False, padding="valid", dilation=2))
    assert no_bias.bias is None
    assert no_bias(torch.randn(1, 4, 20)).shape == (1, 4, 16)


def test_causal_padding_activation_residual_and_repr():
    torch.manual_seed(0)
    m = DilatedConv1d(4, 4, 3, padding="causal", dilation=8, groups=4, activation="silu")
    x = torch.randn(2, 4, 40)
    want = F.silu(F.conv1d(F.pad(x, (16, 0)), m.weight, m.bias, dilation=8, groups=4)) + x
    torch.testing.assert_close(m(x, residual=x), want, atol=1e-5, rtol=1e-5)
    r = repr(m)
    assert "activation='silu'" in r and "dilation=(8,)" in r and "padding=causal" in r
    # causal: output t depends on inputs <= t only
    x2 = x.clone()
    x2[..., 30:] += 1.0
    torch.testing.assert_close(m(x2)[..., :30], m(x)[..., :30])


def test_unbatched_input():
    m = DilatedConv1d(3, 3, 3, padding="causal", dilation=2, groups=3)
    x = torch.randn(3, 17)
    torch.testing.assert_close(m(x), m(x.unsqueeze(0)).squeeze(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=2), "stride 1 only"),
    (dict(padding_mode="reflect"), "padding_mode='zeros' only"),
    (dict(padding="full"), "padding must be"),
    (dict(activation="tanh"), "activation must be"),
])
def test_argument_errors(kwargs, match):
    # nn.Conv1d options fail in the constructor, the activation in the op's own check at the first call
    with pytest.raises(ValueError, match=match):
        DilatedConv1d(4, 4, 3, **kwargs)(torch.randn(1, 4, 9))


def test_tcn_matches_layerwise_reference_and_gradients():
    torch.manual_seed(0)
    tcn = TCN(6, kernel_size=3, num_layers=4, activation="gelu").double()
    x = torch.randn(2, 6, 200, dtype=torch.float64, requires_grad=True)
    h = x
    for i, conv in enumerate(tcn.layers):
        assert conv.dilation == (2**i,)
        h = reference(h, conv.weight, conv.bias, dilation=2**i, padding="causal", groups=6, activation="gelu") + h
    out = tcn(x)
    torch.testing.assert_close(out, h)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + list(tcn.parameters()), g)
    want = torch.autograd.grad(h, [x] + list(tcn.parameters()), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_tcn_receptive_field():
    tcn = TCN(2, kernel_size=3, receptive_field=1000)
    assert tcn.receptive_field >= 1000
    assert TCN(2, kernel_size=3, num_layers=len(tcn.layers) - 1).receptive_field < 1000
    assert "receptive_field=" in repr(tcn)
    with pytest.raises(ValueError, match="exactly one"):
        TCN(2)
