"""The opt-in softmax -> sigmoid conversion: ``accel.patch(model, convert={"attention": "sigmoid"})``.

It changes the maths (for fine-tuning a softmax model into a sigmoid one), so ``accel.patch`` runs
it only when asked by name. It is a method-style patch of one model instance: the model's attention
implementation becomes ``"accel_sigmoid"`` through transformers' own ``set_attn_implementation``
and ``accel.unpatch`` restores the previous one exactly.

transformers keeps the attention implementation on the model's config, which the model shares with
its submodules (a ``*ForCausalLM`` and its ``*Model``): they are converted together. Models loaded
with ``from_pretrained`` / ``from_config`` each own their config; two models built from one config
object (``LlamaForCausalLM(config)`` twice) share it, and converting one converts both.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, List, Optional, Tuple

from torch import nn

from accel.patching import Rule
from accel_transformers.names import NAME

# Attention implementations that compute softmax attention (what the conversion replaces).
_SOFTMAX = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
            "paged|eager")


def _configs(model: nn.Module) -> List[object]:
    """Every config whose attention implementation ``set_attn_implementation`` may change, each once."""
    from transformers import PreTrainedModel

    seen, out = set(), []
    queue = deque([model.config] + [m.config for m in model.modules() if isinstance(m, PreTrainedModel)])
    while queue:
        config = queue.popleft()
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        out.append(config)
        for key in getattr(config, "sub_configs", {}) or {}:
            queue.append(getattr(config, key, None))
    return out


def _check(model: nn.Module) -> Optional[str]:
    from transformers import PreTrainedModel

    from accel.patching.builtin import op_reason

    if not isinstance(model, PreTrainedModel):  # matched by a subclass of the dotted class name
        return "not a transformers PreTrainedModel"
    current = model.config._attn_implementation
    if current == NAME:
        return f"already uses attn_implementation={NAME!r}"
    if current not in _SOFTMAX and not (isinstance(current, str) and current.startswith("flash_attention")):
        return f"attention implementation {current!r} is not one of transformers' softmax implementations"
    if not type(model)._can_set_attn_implementation():
        return f"{type(model).__name__} does not dispatch through transformers' AttentionInterface"
    dropout = getattr(model.config, "attention_dropout", 0.0)
    if isinstance(dropout, (int, float)) and dropout > 0:
        return f"config.attention_dropout={dropout:g} > 0: the fused sigmoid attention kernel has no dropout"
    parameter = next(model.parameters(), None)
    if parameter is None:
        return "has no parameters (cannot tell its device)"
    return op_reason("sigmoid_attention", parameter.device)


def _apply(model: nn.Module) -> Callable[[], None]:
    from accel_transformers.registration import register

    register()
    saved: List[Tuple[object, object]] = [(c, c._attn_implementation_internal) for c in _configs(model)]
    try:
        model.set_attn_implementation(NAME)
    except Exception:
        for config, value in saved:
            config._attn_implementation_internal = value
        raise

    def undo() -> None:
        for config, value in saved:
            config._attn_implementation_internal = value

    return undo


SIGMOID_CONVERSION = Rule(
    name="transformers: softmax attention -> accel_sigmoid",
    op="sigmoid_attention",
    classes=("transformers.modeling_utils.PreTrainedModel",),
    subclasses=True,
    check=_check,
    apply=_apply,
    changes_math=True,
    conversion=("attention", "sigmoid"),
    description="switch a transformers model's attention to sigmoid attention (accel_sigmoid), for fine-tuning",
)
