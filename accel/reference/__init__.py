"""Pure-PyTorch references: the test oracle for every op."""
from accel.reference.dilated_conv1d import dilated_conv1d

__all__ = ["dilated_conv1d"]
