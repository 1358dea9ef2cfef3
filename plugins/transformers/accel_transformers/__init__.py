"""accel plugin for Hugging Face transformers (>= 5).

- ``attn_implementation="accel_sigmoid"``: a transformers attention backend running accel's fused
  sigmoid attention kernels, registered with transformers' ``AttentionInterface`` (and its mask
  function with ``AttentionMaskInterface``) when this package is imported, which ``accel.patch``
  does when it discovers the plugin::

      import accel_transformers
      model = AutoModelForCausalLM.from_config(config, attn_implementation="accel_sigmoid")

- ``accel.patch(model, convert={"attention": "sigmoid"})``: opt-in conversion of a softmax model to
  sigmoid attention (it changes the outputs; for fine-tuning). Without ``convert=`` this plugin
  never changes a model's maths.

Discovered by accel through the ``accel.plugins`` entry point ``transformers = "accel_transformers:plugin"``.
"""
from __future__ import annotations

from accel.patching import Plugin, unmet_requirement
from accel_transformers.conversion import SIGMOID_CONVERSION
from accel_transformers.registration import NAME, REQUIRES, register, registered

__version__ = "0.1.0"

plugin = Plugin(
    name="transformers",
    requires=REQUIRES,
    method_patches=[SIGMOID_CONVERSION],
    description="Hugging Face transformers: the accel_sigmoid attention backend; convert={'attention': 'sigmoid'}",
)

# Register now when transformers>=5 is installed, so attn_implementation="accel_sigmoid" works right
# after `import accel_transformers`. Without it, importing this package must still work: accel imports
# it to read `plugin`, whose requirement check then reports "skipped: needs transformers>=5".
if all(unmet_requirement(req) is None for req in REQUIRES):
    register()

__all__ = ["plugin", "register", "registered", "NAME", "SIGMOID_CONVERSION", "__version__"]
