"""Functional API: each op is a registered torch op with a typed Python wrapper."""
from accel.ops.dilated_conv1d import dilated_conv1d

__all__ = ["dilated_conv1d"]
