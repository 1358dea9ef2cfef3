"""Pure-PyTorch references: the test oracle for every op."""
from accel.reference.dilated_conv1d import dilated_conv1d
from accel.reference.fused_moe import fused_moe, moe_route
from accel.reference.sigmoid_attention import (
    SigmoidMultiheadAttention,
    sigmoid_attention,
    sigmoid_attention_kvcache,
    sigmoid_attention_varlen,
)

__all__ = ["dilated_conv1d", "fused_moe", "moe_route", "sigmoid_attention", "sigmoid_attention_varlen",
           "sigmoid_attention_kvcache", "SigmoidMultiheadAttention"]
