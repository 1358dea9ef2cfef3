"""Drop-in mixture-of-experts modules built on accel.ops.fused_moe.

``FusedExperts`` holds the expert weights in transformers' v5 layout and runs them with transformers'
experts calling convention; ``FusedMoE`` is a whole sparse MoE block (router, experts, optional shared
expert) whose routing and experts run in accel's kernels. ``FusedMoE.from_module`` wraps a sparse MoE block
of a family registered with :func:`register_moe_block` (the accel-transformers plugin registers transformers'
blocks), sharing its parameters, with the same ``state_dict`` keys, outputs and calling convention.

The op module is imported on first construction, not with this file: ``accel.nn`` must stay importable
when ``accel._C`` was built without the fused MoE kernels.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


_OPS = None  # the accel.ops.fused_moe module, once loaded


def _load_ops():
    """``accel.ops.fused_moe`` (the module: ``accel.ops`` may rebind that name to the function)."""
    global _OPS
    if _OPS is None:
        try:
            _OPS = importlib.import_module("accel.ops.fused_moe")
        except ImportError:
            raise
        except Exception as e:  # the extension loads but registers no fused MoE ops (an older build)
            raise ImportError(f"accel.ops.fused_moe is unavailable: {type(e).__name__}: {e}. Rebuild accel._C "
                              "(pip install -e . --no-build-isolation)") from e
    return _OPS


def _ops():
    return _OPS if _OPS is not None else _load_ops()


# ---------------------------------------------------------------- activations

_CLASS_ACTIVATIONS = {
    "transformers.activations.SiLUActivation": "silu",
    "transformers.activations.LinearActivation": "none",
}


def _class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def activation_name(fn) -> Optional[str]:
    """The fused kernel's name for activation ``fn`` (``"silu"``, ``"gelu"``, ``"relu"``, ``"none"``), or None.

    Recognises the torch modules and functions (``nn.SiLU``, ``nn.GELU(approximate="none")``, ``nn.ReLU``,
    ``nn.Identity``, ``F.silu``, ``F.gelu``, ``F.relu``) and transformers' ``ACT2FN`` entries ``"silu"``,
    ``"swish"``, ``"gelu"``, ``"gelu_python"`` (both the erf GELU), ``"relu"`` and ``"linear"``. Exact classes
    only: a subclass may change ``forward``. Tanh-approximated GELUs are not the kernel's (erf) GELU.
    """
    if fn is F.silu:
        return "silu"
    if fn is F.gelu:
        return "gelu"
    if fn is F.relu or fn is torch.relu:
        return "relu"
    kind = type(fn)
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.Identity:
        return "none"
    if kind is nn.GELU:
        return "gelu" if fn.approximate == "none" else None
    path = _class_path(fn)
    if path in _CLASS_ACTIVATIONS:
        return _CLASS_ACTIVATIONS[path]
    if path == "transformers.activations.GELUActivation":
        # its two modes, F.gelu and the Python erf formula, are both the exact GELU
        act = getattr(fn, "act", None)
        return "gelu" if act is F.gelu or getattr(act, "__name__", "") == "_gelu_python" else None
    return None


def _describe(fn) -> str:
    return type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", repr(fn))


# ---------------------------------------------------------------- experts

class FusedExperts(nn.Module):
    """The experts of a mixture of experts: ``num_experts`` gated MLPs ``down(act(gate(x)) * up(x))``.

    Parameters (transformers v5 layout): ``gate_up_proj`` ``(E, 2I, H)``, gate rows first, then up;
    ``down_proj`` ``(E, H, I)``. ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))``
    follows transformers' experts modules and returns ``(T, H)``: each token's experts' outputs weighted by
    its routing weights and summed, in one call of :func:`accel.ops.fused_moe.fused_moe`.

    The experts compute in the parameters' dtype (inputs of another dtype, e.g. under autocast, are cast to
    it) and return the input's dtype.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        _load_ops()
        factory = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's projections initialised like ``nn.Linear`` (uniform, bound ``1/sqrt(fan_in)``)."""
        if self.gate_up_proj.is_meta:
            return
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.intermediate_size),
                         1 / math.sqrt(self.intermediate_size))

    @classmethod
    def from_parameters(cls, gate_up_proj: nn.Parameter, down_proj: nn.Parameter,
                        activation: str = "silu") -> "FusedExperts":
        """Wrap existing ``(E, 2I, H)`` and ``(E, H, I)`` parameters; they are shared, not copied."""
        for name, p in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            if not isinstance(p, nn.Parameter):
                raise TypeError(f"{cls.__name__}.from_parameters: {name} must be an nn.Parameter to be shared, got "
                                f"{type(p).__name__}")
            if p.dim() != 3:
                raise ValueError(f"{cls.__name__}.from_parameters: {name} must be 3-D, got {tuple(p.shape)}")
        experts, inter2, hidden = gate_up_proj.shape
        if inter2 % 2 or down_proj.shape != (experts, hidden, inter2 // 2):
            raise ValueError(f"{cls.__name__}.from_parameters: gate_up_proj (E, 2I, H) = {tuple(gate_up_proj.shape)} "
                             f"and down_proj (E, H, I) = {tuple(down_proj.shape)} do not agree")
        new = cls(experts, hidden, inter2 // 2, activation, device="meta", dtype=gate_up_proj.dtype)
        new.gate_up_proj = gate_up_proj
        new.down_proj = down_proj
        return new

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        dtype = self.gate_up_proj.dtype
        x = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)
        if top_k_weights.dtype not in (torch.float32, dtype):  # the op takes float32 or the hidden dtype
            top_k_weights = top_k_weights.float()
        out = _ops().fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights=top_k_weights,
                               topk_ids=top_k_index, activation=self.activation)
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.activation!r}")


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with bias-free ``nn.Linear`` layers (the submodules
    and ``state_dict`` keys of transformers' gated MLPs, which some models use as a shared expert)."""

    _FUNCTIONS: Dict[str, Callable[[Tensor], Tensor]] = {
        "silu": F.silu, "gelu": F.gelu, "relu": F.relu, "none": lambda t: t}

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", device=None, dtype=None):
        super().__init__()
        if activation not in self._FUNCTIONS:  # this module runs the activation itself, in PyTorch
            raise ValueError(f"{type(self).__name__}: activation must be one of {tuple(self._FUNCTIONS)}, "
                             f"got {activation!r}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self._FUNCTIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# ---------------------------------------------------------------- sparse MoE block families

@dataclass(frozen=True)
class MoEBlockFamily:
    """How :meth:`FusedMoE.from_module` reads one sparse MoE block class.

    The block has ``gate``, a router with ``weight`` ``(E, H)`` and ``top_k`` that returns
    ``(router_logits, top_k_weights, top_k_index)`` when called, and ``experts``, whose ``gate_up_proj``
    ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)`` and ``act_fn`` are read (see :func:`experts_layout_reason`).
    The block's forward returns a plain tensor.
    """

    router: str  # exact class of block.gate, as "module.QualName"
    experts: str  # exact class of block.experts
    renormalize: Callable[[nn.Module], bool]  # from the router
    shared_expert: bool = False  # block.shared_expert, scaled by sigmoid(block.shared_expert_gate(x))
    jitter: bool = False  # block.jitter_noise: x *= U(1 - j, 1 + j) in training, before routing


_BLOCK_FAMILIES: Dict[str, MoEBlockFamily] = {}
_plugins_loaded = False


def register_moe_block(block_class: str, family: MoEBlockFamily) -> None:
    """Let :meth:`FusedMoE.from_module` read blocks of the exact class ``block_class`` (``"module.QualName"``).

    Model-family plugins call this when imported (the accel-transformers plugin registers transformers'
    sparse MoE blocks); registering a class again replaces its family.
    """
    if not isinstance(family, MoEBlockFamily):
        raise TypeError(f"register_moe_block: family must be a MoEBlockFamily, got {type(family).__name__}")
    _BLOCK_FAMILIES[block_class] = family


def registered_moe_blocks() -> Dict[str, MoEBlockFamily]:
    """The registered block classes and their families (a copy)."""
    return dict(_BLOCK_FAMILIES)


def moe_block_family(block: nn.Module) -> Optional[MoEBlockFamily]:
    """The registered family of ``block``'s exact class, or None.

    On the first miss the accel plugins are discovered (``accel.patching.list_plugins``): importing a plugin
    registers its families, so ``from_module`` works without importing the plugin by hand.
    """
    global _plugins_loaded
    path = _class_path(block)
    if path not in _BLOCK_FAMILIES and not _plugins_loaded:
        _plugins_loaded = True
        from accel.patching import list_plugins

        list_plugins()
    return _BLOCK_FAMILIES.get(path)


_DEFAULT_APPLY_GATE = None


def _default_apply_gate():
    """transformers' default ``act(gate) * up`` (cached: the check also runs inside compiled forwards)."""
    global _DEFAULT_APPLY_GATE
    if _DEFAULT_APPLY_GATE is None:
        from transformers.integrations.moe import _default_apply_gate as default

        _DEFAULT_APPLY_GATE = default
    return _DEFAULT_APPLY_GATE


def experts_layout_reason(experts: nn.Module) -> Optional[str]:
    """Why a transformers experts module (``@use_experts_implementation``) is not the fused kernel's layout
    (concatenated ``[gate; up]`` ``(E, 2I, H)``, ``(E, H, I)``, no biases, no post-expert norm, the default
    ``act(gate) * up`` gating, all experts local), or None."""
    if not getattr(experts, "has_gate", True):
        return "experts have no gate projection (up_proj only)"
    if getattr(experts, "has_bias", False):
        return "experts have biases"
    if not getattr(experts, "is_concatenated", True):
        return "gate/up rows are interleaved, not concatenated"
    if getattr(experts, "is_transposed", False):
        return "expert weights are stored transposed"
    if getattr(experts, "has_post_expert_norm", False):
        return "experts apply a post-expert norm"
    if getattr(experts, "_is_expert_parallel", False):
        return "experts are sharded for expert parallelism"
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, Tensor) or not isinstance(down, Tensor):
        return "no gate_up_proj / down_proj tensors"
    if type(gate_up).__name__ == "DTensor" or type(down).__name__ == "DTensor":
        return "expert weights are distributed tensors (DTensor)"
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * down.shape[2] \
            or down.shape[:2] != (gate_up.shape[0], gate_up.shape[2]):
        return (f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not (E, 2I, H) and "
                "(E, H, I)")
    num_experts = getattr(experts, "num_experts", gate_up.shape[0])
    if num_experts != gate_up.shape[0]:
        return f"num_experts={num_experts} but {gate_up.shape[0]} experts are stored here (expert parallelism?)"
    gate_fn = getattr(experts, "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__func__", gate_fn) is not _default_apply_gate():
        return f"{type(experts).__name__} has its own gating (_apply_gate), not act(gate) * up"
    if activation_name(getattr(experts, "act_fn", None)) is None:
        return f"experts activation {_describe(getattr(experts, 'act_fn', None))} has no fused kernel"
    return None


# ---------------------------------------------------------------- FusedMoE

class FusedMoE(nn.Module):
    """A sparse mixture-of-experts block: top-k routing, ``num_experts`` gated MLPs and an optional shared
    expert, with routing and experts in accel's fused kernels.

    ``forward(x (..., H)) -> (..., H)``: ``logits = gate(x)`` (in the model's dtype), then
    :func:`accel.ops.fused_moe.fused_moe` scores them in float32 (``"softmax"`` over all experts, or
    ``"sigmoid"``), keeps each token's ``top_k`` experts (renormalised to sum to 1 if ``renormalize``) and
    runs them. With a shared expert, ``shared_expert(x)`` is added, scaled by
    ``sigmoid(shared_expert_gate(x))`` when ``shared_expert_gate=True``.

    Submodules and ``state_dict`` keys are those of transformers' sparse MoE blocks: ``gate.weight``
    ``(E, H)``, ``experts.gate_up_proj`` ``(E, 2I, H)`` (gate rows first, then up), ``experts.down_proj``
    ``(E, H, I)`` (a :class:`FusedExperts`), ``shared_expert.{gate,up,down}_proj.weight`` (a :class:`GatedMLP`),
    ``shared_expert_gate.weight``; ``gate_up_proj`` and ``down_proj`` are also attributes of the block.

    Args:
        hidden_size, intermediate_size: ``H`` and each expert's ``I``.
        num_experts, top_k: ``E`` and experts per token (``1 <= top_k <= E``).
        renormalize: rescale each token's kept weights to sum to 1.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        activation: ``"silu"``, ``"gelu"`` (erf), ``"relu"`` or ``"none"``; the shared expert's too.
        router: build the ``gate`` router (``nn.Linear(H, E, bias=False)``). ``False``: no router, and
            ``forward(x, router_logits)`` takes the logits ``(..., E)``.
        shared_expert_intermediate_size: add a shared expert (:class:`GatedMLP`) of this size.
        shared_expert_gate: scale the shared expert by ``sigmoid(Linear(H, 1)(x))``.
        jitter_noise: in training mode, multiply the input by uniform noise in ``[1 - j, 1 + j]`` before
            routing and experts (a router jitter as in transformers: the same draw from the same RNG, so seeded
            runs reproduce transformers exactly). Inactive in eval mode.

    Built by :meth:`from_module`, the submodules are the transformers block's own (``gate``, ``experts``,
    ``shared_expert``, ``shared_expert_gate``): nothing is copied, a later ``load_state_dict(assign=True)``
    reaches the original modules, and transformers' output recorders for ``output_router_logits`` (forward
    hooks on the router) keep working. While the router has forward hooks it is called and its routing is
    used; otherwise the logits are ``F.linear(x, gate.weight)``, exactly what it computes, and the routing
    runs in the fused kernel. Only the experts' ``gate_up_proj`` and ``down_proj`` are read; their module's
    forward (transformers' experts loop) is never called.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = True,
        scoring: str = "softmax",
        activation: str = "silu",
        router: bool = True,
        shared_expert_intermediate_size: Optional[int] = None,
        shared_expert_gate: bool = False,
        jitter_noise: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        # top_k, scoring and activation are checked by the ops when the block runs
        if shared_expert_gate and shared_expert_intermediate_size is None:
            raise ValueError(f"{name}: shared_expert_gate=True needs a shared expert "
                             "(shared_expert_intermediate_size)")
        if not isinstance(jitter_noise, (int, float)) or isinstance(jitter_noise, bool) or not 0 <= jitter_noise < 1:
            raise ValueError(f"{name}: jitter_noise must be a float in [0, 1), got {jitter_noise!r}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = bool(renormalize)
        self.scoring = scoring
        self.activation = activation
        self.jitter_noise = float(jitter_noise)
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **factory) if router else None
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, activation, **factory)
        self.shared_expert = None if shared_expert_intermediate_size is None else \
            GatedMLP(hidden_size, shared_expert_intermediate_size, activation, **factory)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **factory) if shared_expert_gate else None

    # ------------------------------------------------------------ the experts' parameters, as attributes

    @property
    def gate_up_proj(self) -> nn.Parameter:
        return self.experts.gate_up_proj

    @gate_up_proj.setter
    def gate_up_proj(self, value: nn.Parameter) -> None:
        self.experts.gate_up_proj = value

    @property
    def down_proj(self) -> nn.Parameter:
        return self.experts.down_proj

    @down_proj.setter
    def down_proj(self, value: nn.Parameter) -> None:
        self.experts.down_proj = value

    # ------------------------------------------------------------ construction from a registered block

    @classmethod
    def from_module(cls, block: nn.Module) -> "FusedMoE":
        """Wrap a sparse MoE block of a registered family (:func:`register_moe_block`; the accel-transformers
        plugin registers transformers' blocks): its submodules (router, experts, shared expert and its gate)
        become this module's, shared, not copied. Like the block, the result takes and returns one tensor.

        Raises TypeError for classes no family is registered for, and ValueError when the experts' layout or
        activation has no fused kernel (e.g. a tanh-approximated GELU).
        """
        family = moe_block_family(block)
        if family is None:
            names = ", ".join(p.rsplit(".", 1)[-1] for p in registered_moe_blocks()) or "none (no plugin registered one)"
            raise TypeError(f"{cls.__name__}.from_module expects a registered sparse MoE block class: "
                            f"{names}; got {type(block).__name__}")
        router, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        for what, module, want in (("gate", router, family.router), ("experts", experts, family.experts)):
            if module is None or _class_path(module) != want:
                raise TypeError(f"{cls.__name__}.from_module: {type(block).__name__}.{what} is "
                                f"{type(module).__name__}, expected {want.rsplit('.', 1)[-1]}")
        reason = experts_layout_reason(experts)
        if reason is not None:
            raise ValueError(f"{cls.__name__}.from_module: {type(block).__name__}: {reason}")
        activation = activation_name(experts.act_fn)
        num_experts, hidden_size, intermediate_size = experts.down_proj.shape
        if tuple(router.weight.shape) != (num_experts, hidden_size):
            raise ValueError(f"{cls.__name__}.from_module: router weight {tuple(router.weight.shape)} does not match "
                             f"{num_experts} experts of hidden size {hidden_size}")
        shared, shared_gate, shared_size = None, None, None
        if family.shared_expert:
            shared, shared_gate = block.shared_expert, block.shared_expert_gate
            shared_size = shared.down_proj.in_features
        new = cls(hidden_size, intermediate_size, num_experts, int(router.top_k),
                  renormalize=family.renormalize(router), scoring="softmax", activation=activation, router=False,
                  jitter_noise=float(getattr(block, "jitter_noise", 0.0) or 0.0) if family.jitter else 0.0,
                  device="meta", dtype=experts.gate_up_proj.dtype)
        new.gate = router
        new.experts = experts  # the module itself: load_state_dict(assign=True) then reaches the original
        new.shared_expert, new.shared_expert_gate = shared, shared_gate
        new.shared_expert_intermediate_size = shared_size
        for name in [n for n in block._modules if n in new._modules]:  # the block's order: same state_dict order
            new._modules[name] = new._modules.pop(name)
        new.train(block.training)
        return new

    # ------------------------------------------------------------ forward

    def forward(self, x: Tensor, router_logits: Optional[Tensor] = None) -> Tensor:
        name = type(self).__name__
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: expected input (..., {self.hidden_size}), got {tuple(x.shape)}")
        if (router_logits is None) == (self.gate is None):
            raise ValueError(f"{name}: pass router_logits exactly when the module has no router (router=False)")
        if self.training and self.jitter_noise > 0:
            # the block's own jitter (in place there, on a tensor nothing reads again): same draw, same RNG
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        flat = x.reshape(-1, self.hidden_size)
        dtype = self.experts.gate_up_proj.dtype
        hidden = flat if flat.dtype == dtype else flat.to(dtype)
        gate = self.gate
        if router_logits is not None:
            router_logits = router_logits.reshape(-1, self.num_experts)
            out = self._run(hidden, router_logits=router_logits)
        elif isinstance(gate, nn.Linear):
            out = self._run(hidden, router_logits=gate(hidden))
        elif gate._forward_hooks or gate._forward_pre_hooks or "forward" in gate.__dict__:
            # a transformers router with hooks (transformers' router-logit recorder, or the user's): call it
            _, weights, ids = gate(hidden)
            out = self._run(hidden, topk_weights=weights, topk_ids=ids)
        else:
            out = self._run(hidden, router_logits=F.linear(hidden, gate.weight))
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out = out + shared
        return out.reshape(x.shape).to(x.dtype)

    def _run(self, hidden: Tensor, router_logits: Optional[Tensor] = None, topk_weights: Optional[Tensor] = None,
             topk_ids: Optional[Tensor] = None) -> Tensor:
        """The experts on ``hidden``, routed by ``router_logits`` (in the kernel) or ``topk_weights``/``topk_ids``
        (the experts module's own forward is never called: from transformers it would run their loop)."""
        if topk_weights is not None and topk_weights.dtype not in (torch.float32, hidden.dtype):
            topk_weights = topk_weights.float()
        return _ops().fused_moe(hidden, self.experts.gate_up_proj, self.experts.down_proj,
                                router_logits=router_logits, topk_weights=topk_weights, topk_ids=topk_ids,
                                top_k=self.top_k, renormalize=self.renormalize, scoring=self.scoring,
                                activation=self.activation, check_ids=False)  # ids from this module's router

    def extra_repr(self) -> str:
        s = (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
             f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
             f"scoring={self.scoring!r}, activation={self.activation!r}")
        if self.shared_expert is not None:
            s += f", shared_expert_intermediate_size={self.shared_expert_intermediate_size}"
            s += f", shared_expert_gate={self.shared_expert_gate is not None}"
        if self.jitter_noise:
            s += f", jitter_noise={self.jitter_noise:g}"
        return s
