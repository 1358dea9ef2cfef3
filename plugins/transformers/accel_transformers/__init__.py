"""accel plugin for Hugging Face transformers (>= 5).

- ``attn_implementation="accel_sigmoid"``: a transformers attention backend running accel's fused
  sigmoid attention kernels, registered with transformers' ``AttentionInterface`` (and its mask
  function with ``AttentionMaskInterface``) when this package is imported, which ``accel.patch``
  does when it discovers the plugin::

      import accel_transformers
      model = AutoModelForCausalLM.from_config(config, attn_implementation="accel_sigmoid")

- ``experts_implementation="accel"``: a transformers experts implementation running accel's fused MoE
  kernel, registered with transformers' ``ExpertsInterface`` at the same time::

      model = AutoModelForCausalLM.from_config(config, experts_implementation="accel")

- ``accel.patch(model)`` replaces Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE sparse MoE blocks by
  ``accel.nn.FusedMoE`` (routing and experts fused, parameters shared; the outputs stay the same).

- ``accel.patch(model)`` routes hybrid models' causal depthwise conv (Mamba, Mamba2, Jamba, Bamba, LFM2,
  Qwen3-Next, ...: every modeling module defining ``causal_conv1d_forward`` / ``_update`` / ``_fn``) through
  ``accel.ops.streaming_conv1d`` (cached decode) and ``accel.ops.dilated_conv1d`` (prefill); those functions
  are module globals, so this holds for the whole modeling module while any of its layers is patched.

- ``accel.patch(model, convert={"attention": "sigmoid"})``: opt-in conversion of a softmax model to
  sigmoid attention (it changes the outputs; for fine-tuning). Without ``convert=`` this plugin
  never changes a model's maths.

Discovered by accel through the ``accel.plugins`` entry point ``transformers = "accel_transformers:plugin"``.
"""
from __future__ import annotations

from accel.patching import Plugin, unmet_requirement
from accel_transformers.conv_state import CAUSAL_CONV_RULE
from accel_transformers.conversion import SIGMOID_CONVERSION
from accel_transformers.moe import MOE_BLOCK_RULE
from accel_transformers.names import EXPERTS_NAME, NAME, REQUIRES
from accel_transformers.registration import register, registered

__version__ = "0.1.0"

plugin = Plugin(
    name="transformers",
    requires=REQUIRES,
    rules=[MOE_BLOCK_RULE],
    method_patches=[SIGMOID_CONVERSION, CAUSAL_CONV_RULE],
    description="Hugging Face transformers: the accel_sigmoid attention backend, the accel experts implementation, "
                "sparse MoE blocks -> FusedMoE, hybrid models' causal conv -> streaming_conv1d / dilated_conv1d; "
                "convert={'attention': 'sigmoid'}",
)

# Register now when transformers>=5 is installed, so attn_implementation="accel_sigmoid",
# experts_implementation="accel" and FusedMoE.from_module(block) work right after
# `import accel_transformers`. Without it, importing this package must still work: accel imports it
# to read `plugin`, whose requirement check then reports "skipped: needs transformers>=5".
if all(unmet_requirement(req) is None for req in REQUIRES):
    register()

__all__ = ["plugin", "register", "registered", "NAME", "EXPERTS_NAME", "SIGMOID_CONVERSION", "MOE_BLOCK_RULE",
           "CAUSAL_CONV_RULE", "__version__"]
