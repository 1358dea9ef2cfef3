"""Functional API: each op is a registered torch op with a typed Python wrapper.

Every module here declares its op's capability record (``CAPABILITY``); the public functions listed
there are exported from ``accel.ops``.
"""
from accel.ops._capability import Capability, Example, capabilities, capability, public_functions

globals().update(public_functions())

__all__ = sorted(public_functions()) + ["Capability", "Example", "capabilities", "capability"]
