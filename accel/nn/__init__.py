"""Drop-in nn.Module replacements."""
from accel.nn.dilated_conv import TCN, DilatedConv1d
from accel.nn.fused_moe import FusedMoE
from accel.nn.partial_conv import PartialConv2d
from accel.nn.pat import PATChannel
from accel.nn.sigmoid_attention import (
    AdaptedSigmoidMultiheadAttention,
    SigmoidAttention,
    SigmoidMultiheadAttention,
)
from accel.nn.streaming_conv import StreamingConv1d, StreamingTCN

__all__ = [
    "DilatedConv1d", "TCN", "FusedMoE", "SigmoidAttention", "SigmoidMultiheadAttention",
    "AdaptedSigmoidMultiheadAttention", "StreamingConv1d", "StreamingTCN", "PartialConv2d", "PATChannel",
]
