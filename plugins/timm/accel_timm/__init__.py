"""accel plugin for timm (>= 1.0).

- ``accel.patch(model)`` replaces FasterNet's partial convolution, timm's
  ``timm.models.fasternet.Partial_conv3`` (``stages.{i}.blocks.{j}.spatial_mixing``), by
  ``accel.nn.PartialConv2d``, which shares its ``partial_conv3`` convolution: the state_dict keys and the
  outputs stay the same, and ``accel.unpatch(model)`` puts the original modules back::

      model = timm.create_model("fasternet_t0")
      report = accel.patch(model)

Discovered by accel through the ``accel.plugins`` entry point ``timm = "accel_timm:plugin"``. Importing
this package imports neither timm nor accel's native extension.
"""
from __future__ import annotations

from accel.patching import Plugin
from accel_timm.partial_conv import PARTIAL_CONV3, PARTIAL_CONV_RULE

__version__ = "0.1.0"

REQUIRES = ("timm>=1.0",)

plugin = Plugin(
    name="timm",
    requires=REQUIRES,
    rules=[PARTIAL_CONV_RULE],
    description="timm: FasterNet's Partial_conv3 -> accel.nn.PartialConv2d",
)

__all__ = ["plugin", "PARTIAL_CONV_RULE", "PARTIAL_CONV3", "REQUIRES", "__version__"]
