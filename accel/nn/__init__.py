"""Drop-in nn.Module replacements."""
from accel.nn.dilated_conv import TCN, DilatedConv1d

__all__ = ["DilatedConv1d", "TCN"]
