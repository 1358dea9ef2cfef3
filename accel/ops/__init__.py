"""Functional API: each op is a registered torch op with a typed Python wrapper."""
from accel.ops.dilated_conv1d import dilated_conv1d
from accel.ops.fused_moe import fused_moe, moe_route
from accel.ops.sigmoid_attention import (
    sigmoid_attention,
    sigmoid_attention_kvcache,
    sigmoid_attention_varlen,
)

__all__ = ["dilated_conv1d", "fused_moe", "moe_route", "sigmoid_attention", "sigmoid_attention_varlen", "sigmoid_attention_kvcache"]
