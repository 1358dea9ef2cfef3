"""transformers' sparse MoE blocks that ``accel.nn.FusedMoE.from_module`` reads, and how to read each.

Named by class path, as plain data, so that importing the plugin imports neither transformers nor the
native extension; :func:`register_moe_blocks` hands them to ``accel.nn.fused_moe.register_moe_block``.
Their code is the same in transformers 5.17 and 5.24.
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn


def _family(module: str, prefix: str, **kw) -> Dict[str, Any]:
    """``accel.nn.fused_moe.MoEBlockFamily`` arguments for ``transformers.models.<module>``'s classes."""
    path = f"transformers.models.{module}.modeling_{module}."
    return dict(router=path + prefix + "TopKRouter", experts=path + prefix + "Experts", **kw)


def _always(router: nn.Module) -> bool:
    return True


def _norm_topk_prob(router: nn.Module) -> bool:
    return bool(router.norm_topk_prob)


# block class -> MoEBlockFamily arguments
MOE_BLOCK_FAMILIES: Dict[str, Dict[str, Any]] = {
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock":
        _family("mixtral", "Mixtral", renormalize=_always, jitter=True),
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock":
        _family("qwen2_moe", "Qwen2Moe", renormalize=_norm_topk_prob, shared_expert=True),
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock":
        _family("qwen3_moe", "Qwen3Moe", renormalize=_norm_topk_prob),
    "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock":
        _family("olmoe", "Olmoe", renormalize=_norm_topk_prob),
}
MOE_BLOCKS = tuple(MOE_BLOCK_FAMILIES)


def register_moe_blocks() -> None:
    """Register every block above with ``FusedMoE.from_module`` (imports ``accel.nn``: needs ``accel._C``)."""
    from accel.nn.fused_moe import MoEBlockFamily, register_moe_block

    for block, family in MOE_BLOCK_FAMILIES.items():
        register_moe_block(block, MoEBlockFamily(**family))
