"""Drop-in modules built on accel.ops.dilated_conv1d."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from accel.ops.dilated_conv1d import dilated_conv1d


def _single(v, name):
    if isinstance(v, (tuple, list)):
        if len(v) != 1:
            raise ValueError(f"DilatedConv1d: {name} must be an int or a 1-tuple, got {v!r}")
        v = v[0]
    return int(v)


def share_conv(cls, conv: nn.Conv1d, activation: Optional[str]):
    """``cls`` built with ``conv``'s arguments on the meta device, then given ``conv``'s parameters (shared,
    not copied) and training mode: the ``from_module`` of the conv-like modules."""
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device="meta", dtype=conv.weight.dtype, activation=activation,
    )
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new


class DilatedConv1d(nn.Conv1d):
    """``nn.Conv1d`` look-alike (stride 1, zeros padding) running accel's dilated convolution kernel.

    Same constructor arguments, attributes and ``state_dict`` keys as ``nn.Conv1d``; it *is* an
    ``nn.Conv1d`` (subclass), so code that checks ``isinstance(m, nn.Conv1d)`` keeps working.
    Additions: ``padding="causal"`` (left ``(K-1)*dilation``), a fused ``activation``
    (``None``/``"relu"``/``"gelu"``/``"silu"``) and ``forward(x, residual=None)`` with a fused
    residual add after the activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Union[str, int, tuple] = 0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        activation: Optional[str] = None,
    ):
        if _single(stride, "stride") != 1:
            raise ValueError(f"DilatedConv1d supports stride 1 only, got stride={stride!r}")
        if padding_mode != "zeros":
            raise ValueError(f"DilatedConv1d supports padding_mode='zeros' only, got {padding_mode!r}")
        if isinstance(padding, str):
            if padding not in ("causal", "same", "valid"):
                raise ValueError(f"DilatedConv1d: padding must be 'causal', 'same', 'valid' or an int, got {padding!r}")
            accel_padding = 0 if padding == "valid" else padding
        else:
            accel_padding = _single(padding, "padding")  # its range is checked by accel.ops.dilated_conv1d
        # nn.Conv1d's constructor does not know "causal"; it is handed an equivalent it accepts.
        super().__init__(
            in_channels, out_channels, kernel_size, stride=1,
            padding=0 if padding == "causal" else padding,
            dilation=dilation, groups=groups, bias=bias, padding_mode="zeros", device=device, dtype=dtype,
        )
        if padding == "causal":
            self.padding = "causal"
        self._accel_padding = accel_padding
        self.activation = activation

    @classmethod
    def from_module(cls, conv: nn.Conv1d, activation: Optional[str] = None) -> "DilatedConv1d":
        """Wrap an existing ``nn.Conv1d``; the parameters are shared, not copied."""
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"DilatedConv1d.from_module expects an nn.Conv1d, got {type(conv).__name__}")
        return share_conv(cls, conv, activation)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
            residual = residual.unsqueeze(0) if residual is not None else None
        y = dilated_conv1d(
            x, self.weight, self.bias, dilation=self.dilation[0], padding=self._accel_padding,
            groups=self.groups, activation=self.activation, residual=residual,
        )
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s


class TCN(nn.Module):
    """Temporal convolutional network: a stack of causal depthwise dilated convolutions.

    Layer ``i`` has dilation ``2**i``; each is ``h = act(conv_i(h) + b_i) + h`` with bias,
    activation and residual fused into one kernel pass. The receptive field is
    ``1 + (K-1) * (2**num_layers - 1)``; pass ``receptive_field`` instead of ``num_layers`` to get
    the fewest layers that cover it (TCNCA replaces a length-L recurrence by such a stack).

    Input and output: ``(B, channels, L)``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        num_layers: Optional[int] = None,
        *,
        receptive_field: Optional[int] = None,
        activation: Optional[str] = "gelu",
        bias: bool = True,
        residual: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"TCN: kernel_size must be >= 2, got {kernel_size}")
        if (num_layers is None) == (receptive_field is None):
            raise ValueError("TCN: give exactly one of num_layers and receptive_field")
        if num_layers is None:
            num_layers = 1
            while 1 + (kernel_size - 1) * (2**num_layers - 1) < receptive_field:
                num_layers += 1
        if num_layers < 1:
            raise ValueError(f"TCN: num_layers must be >= 1, got {num_layers}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.residual = residual
        self.layers = nn.ModuleList(
            DilatedConv1d(
                channels, channels, kernel_size, padding="causal", dilation=2**i, groups=channels, bias=bias,
                activation=activation, device=device, dtype=dtype,
            )
            for i in range(num_layers)
        )

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * (2 ** len(self.layers) - 1)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv in self.layers:
            h = conv(h, residual=h if self.residual else None)
        return h

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, num_layers={len(self.layers)}, "
                f"receptive_field={self.receptive_field}, residual={self.residual}")
