"""Mixture of experts for transformers: the ``"accel"`` experts implementation and the sparse MoE block rule.

- ``experts_implementation="accel"``: :func:`accel_experts_forward`, registered with transformers'
  ``ExpertsInterface``, runs an experts module (``@use_experts_implementation``) in one call of
  ``accel.ops.fused_moe`` with the routing the block computed. Experts it cannot run exactly fall back to
  transformers' eager loop, with one warning per reason.
- ``MOE_BLOCK_RULE``: ``accel.patch`` replaces Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE sparse MoE blocks
  by ``accel.nn.FusedMoE.from_module(block)`` (routing fused too), sharing their parameters.
"""
from __future__ import annotations

import threading
import warnings
from typing import Optional, Set, Tuple

import torch
from torch import Tensor, nn

from accel import _ext
from accel.patching import Rule
from accel_transformers.blocks import MOE_BLOCKS, register_moe_blocks
from accel_transformers.names import EXPERTS_NAME

_fused = None  # accel.nn.fused_moe, imported on first use: it needs the native extension
_REASONS = {}  # (device type, dtype) -> why the fused MoE cannot run there (None: it can)


def _fused_moe():
    global _fused
    if _fused is None:
        from accel.nn import fused_moe

        _fused = fused_moe
    return _fused


def prepare() -> None:
    """Import what the experts forward needs and read the op's capability record now, eagerly: doing either
    inside a compiled forward would break the graph; and register the sparse MoE blocks with
    ``FusedMoE.from_module``. Called by ``register()``."""
    if _ext.available():
        register_moe_blocks()
        from accel.ops import capability

        # CUDA devices only where CUDA is already initialised: reading a GPU's compute capability
        # would otherwise create a CUDA context at import (fork-based workers, multi-rank jobs).
        devices = [torch.device("cpu")]
        if torch.cuda.is_initialized():
            devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        dtypes = capability("fused_moe").dtypes
        for device in devices:
            for dtype in dtypes.get(device.type, ()):
                _kernel_reason(device, dtype)
        _fused_moe()._default_apply_gate()


def _kernel_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (device.type, index, dtype)
    if key not in _REASONS:
        from accel.patching.builtin import op_reason

        _REASONS[key] = op_reason("fused_moe", device, dtype)
    return _REASONS[key]


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in module.__dict__


# ---------------------------------------------------------------- experts_implementation="accel"

_warned: Set[Tuple[str, str]] = set()
_warn_lock = threading.Lock()


class ExpertsFallbackWarning(UserWarning):
    """``experts_implementation="accel"`` met experts it cannot run exactly and used the eager loop instead."""


def _experts_reason(experts: nn.Module, hidden_states: Tensor) -> Optional[str]:
    weight = getattr(experts, "gate_up_proj", None)
    if isinstance(weight, Tensor):
        reason = _kernel_reason(weight.device, weight.dtype)  # first: the layout check needs accel.nn
        if reason is not None:
            return reason
    reason = _fused_moe().experts_layout_reason(experts)
    if reason is not None:
        return reason
    if weight.dtype != experts.down_proj.dtype:
        return "gate_up_proj and down_proj have different dtypes"
    if hidden_states.device != weight.device:
        return f"hidden states on {hidden_states.device}, expert weights on {weight.device}"
    return None


def _eager(experts: nn.Module):
    """The experts class's own forward: ``@use_experts_implementation`` keeps it as ``forward.__wrapped__``."""
    forward = getattr(type(experts).forward, "__wrapped__", None)
    if forward is None:
        raise RuntimeError(f"experts_implementation={EXPERTS_NAME!r}: {type(experts).__name__} cannot run in the fused "
                           "kernel and has no eager forward to fall back to (not a @use_experts_implementation class)")
    return forward


def accel_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                          top_k_weights: Tensor) -> Tensor:
    """transformers experts forward: ``(T, H)`` tokens, ``(T, k)`` expert ids and routing weights -> ``(T, H)``.

    Runs ``accel.ops.fused_moe`` on the module's ``gate_up_proj`` / ``down_proj`` when they are in the
    standard layout (concatenated gate and up rows, not transposed, no biases, no post-expert norm, default
    gating, no expert parallelism), the activation is SiLU, GELU (erf) or ReLU, and a kernel exists for the
    device and dtype. Otherwise it runs the class's eager forward and warns once per reason.
    """
    reason = _experts_reason(self, hidden_states)
    if reason is None:
        fused = _fused_moe()
        dtype = self.gate_up_proj.dtype
        x = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)  # autocast: as grouped_mm
        weights = top_k_weights if top_k_weights.dtype in (torch.float32, dtype) else top_k_weights.float()
        out = fused._ops().fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights=weights,
                                     topk_ids=top_k_index, activation=fused.activation_name(self.act_fn),
                                     check_ids=False)  # the model's router: a top-k over E experts
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)
    key = (type(self).__name__, reason)
    if key not in _warned:
        with _warn_lock:
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"experts_implementation={EXPERTS_NAME!r}: {type(self).__name__} runs transformers' "
                              f"eager experts loop instead of accel's fused kernel: {reason}",
                              ExpertsFallbackWarning, stacklevel=2)
    return _eager(self)(self, hidden_states, top_k_index, top_k_weights)


# ---------------------------------------------------------------- the sparse MoE block rule

def _block_check(block: nn.Module) -> Optional[str]:
    experts = getattr(block, "experts", None)
    weight = getattr(experts, "gate_up_proj", None)
    if not isinstance(weight, Tensor):
        return "its experts module has no gate_up_proj tensor"
    reason = _kernel_reason(weight.device, weight.dtype)  # first: the checks below need accel.nn
    if reason is not None:
        return reason
    fused = _fused_moe()
    family = fused.moe_block_family(block)
    if family is None:
        return f"{type(block).__name__} is not registered with FusedMoE.from_module"
    for what, want in (("gate", family.router), ("experts", family.experts)):
        child = getattr(block, what, None)
        if child is None or fused._class_path(child) != want:
            return f"its {what} is {type(child).__name__}, not {want.rsplit('.', 1)[-1]}"
    reason = fused.experts_layout_reason(experts)
    if reason is not None:
        return reason
    if _hooked(experts):
        return "its experts module has hooks or a patched forward, which FusedMoE would bypass"
    parameters = list(block.parameters())
    dtypes = {p.dtype for p in parameters}
    if len(dtypes) > 1:
        return f"its parameters have different dtypes ({', '.join(sorted(str(d) for d in dtypes))})"
    devices = {p.device for p in parameters}
    if len(devices) > 1:
        return f"its parameters are on different devices ({', '.join(sorted(str(d) for d in devices))})"
    return None


def _block_build(block: nn.Module) -> nn.Module:
    return _fused_moe().FusedMoE.from_module(block)


MOE_BLOCK_RULE = Rule(
    name="transformers: sparse MoE block -> FusedMoE",
    op="fused_moe",
    classes=MOE_BLOCKS,
    check=_block_check,
    build=_block_build,
    description="Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE sparse MoE blocks -> accel.nn.FusedMoE (fused routing "
                "and experts, parameters shared)",
)
