"""Registering accel's functions with transformers: the ``"accel_sigmoid"`` attention and mask functions and
the ``"accel"`` experts implementation."""
from __future__ import annotations

import threading

from accel.patching import unmet_requirement
from accel_transformers.names import EXPERTS_NAME, NAME, REQUIRES

_lock = threading.Lock()


def register() -> None:
    """Make ``attn_implementation="accel_sigmoid"`` and ``experts_implementation="accel"`` available to every
    transformers model (idempotent).

    Registers the attention function with ``transformers.AttentionInterface`` and its mask function
    with ``transformers.masking_utils.AttentionMaskInterface``: without the latter, transformers would
    hand the attention function no mask at all (padding silently ignored). Registers the experts function
    with ``transformers.integrations.moe.ExpertsInterface``. Raises ImportError when transformers>=5 or
    accel's native extension is missing.
    """
    for req in REQUIRES:
        unmet = unmet_requirement(req)
        if unmet:
            raise ImportError(f"accel_transformers {unmet}")
    with _lock:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        from transformers.integrations.moe import ExpertsInterface

        from accel_transformers import moe
        from accel_transformers.attention import sigmoid_attention_forward
        from accel_transformers.masks import sigmoid_attention_mask

        if AttentionInterface._global_mapping.get(NAME) is not sigmoid_attention_forward:
            AttentionInterface.register(NAME, sigmoid_attention_forward)
        if AttentionMaskInterface._global_mapping.get(NAME) is not sigmoid_attention_mask:
            AttentionMaskInterface.register(NAME, sigmoid_attention_mask)
        moe.prepare()
        if ExpertsInterface._global_mapping.get(EXPERTS_NAME) is not moe.accel_experts_forward:
            ExpertsInterface.register(EXPERTS_NAME, moe.accel_experts_forward)


def registered() -> bool:
    """Whether all three functions are registered with transformers (False when transformers is not imported)."""
    import sys

    if any(m not in sys.modules for m in ("transformers.masking_utils", "transformers.modeling_utils",
                                          "transformers.integrations.moe")):
        return False
    from transformers import AttentionInterface
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import AttentionMaskInterface

    return (NAME in AttentionInterface._global_mapping and NAME in AttentionMaskInterface._global_mapping
            and EXPERTS_NAME in ExpertsInterface._global_mapping)
