"""Hybrid models' causal depthwise convolution through accel: ``CAUSAL_CONV_RULE``.

transformers' hybrid (SSM / linear-attention) families (Mamba, Mamba2, FalconMamba, Jamba, Zamba, Bamba,
NemotronH, GraniteMoeHybrid, LFM2, Qwen3-Next, Qwen3.5, ...) each define, in their modeling module, the
same three functions: ``causal_conv1d_forward(conv1d, hidden_states, cache, layer_idx, ...)``, which the
mixer layer calls, and the two it calls, ``causal_conv1d_update`` (cached decode: the conv state
``(B, C, state_len)`` is updated in place) and ``causal_conv1d_fn`` (prefill: a causal depthwise conv).
``accel.patch`` replaces the latter two with functions running ``accel.ops.streaming_conv1d`` (decode) and
``accel.ops.dilated_conv1d`` (prefill, ``padding="causal"``), with the activation fused.

- Detection is by where a layer's class is defined, not by class: a module matches when its class's Python
  module defines all three functions, a method of the class calls ``causal_conv1d_forward`` and it has a
  depthwise ``nn.Conv1d`` child, so new families and remote-code copies of transformers' modeling files are
  covered as they are.
- The layers look the functions up as module globals, so replacing them is per Python module, not per
  instance: while any layer of a modeling module is patched, every layer that module defines (other
  models of the family included) runs through accel, with the same outputs within the ops' tolerance.
  Each patched layer holds one reference on its module's replacement; unpatching the last one puts the
  original functions back (the same objects).
- Anything accel cannot run exactly goes to the original function: packed sequences (``seq_idx`` /
  ``cu_seqlens``), activations other than SiLU, erf GELU and ReLU, a device or dtype without a kernel,
  mixed dtypes between the conv state and the weight, a non-contiguous or too short conv state.
"""
from __future__ import annotations

import inspect
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from accel.patching import PatchWarning, Rule

UPDATE, FN, FORWARD = "causal_conv1d_update", "causal_conv1d_fn", "causal_conv1d_forward"
_REPLACED = (UPDATE, FN)  # causal_conv1d_forward keeps its cache bookkeeping; it calls these two as globals

# transformers' activation names (ACT2FN) whose function accel fuses exactly: ACT2FN["gelu"] is the erf form.
_ACTIVATIONS = {None: None, "silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu"}
# Keyword arguments with which the causal-conv1d package's causal_conv1d_fn computes something else (packed
# sequences, carried states): left to the original, whatever it makes of them (its torch path refuses packing).
_CONV_FN_ONLY = ("cu_seqlens", "seq_idx", "initial_states", "return_final_states", "final_states_out")

_ops = None  # accel.ops, imported by prepare(): importing it inside a compiled forward would break the graph
_REASONS: Dict[tuple, Optional[str]] = {}  # (op, device type, index, dtype) -> why accel cannot run it there


def prepare(devices=()) -> None:
    """Import accel.ops and read the ops' capability records now, eagerly, for the CPU, CUDA devices already
    initialised and ``devices``: done inside a compiled forward, either would break the graph."""
    global _ops
    if _ops is None:
        import accel.ops

        _ops = accel.ops
    # CUDA devices only where CUDA is already initialised: querying one would create a CUDA context.
    wanted = [torch.device("cpu"), *devices]
    if torch.cuda.is_initialized():
        wanted += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for op in ("streaming_conv1d", "dilated_conv1d"):
        dtypes = _ops.capability(op).dtypes
        for device in wanted:
            for dtype in dtypes.get(device.type, ()):
                _reason(op, device, dtype)


def _reason(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (op, device.type, index, dtype)
    if key not in _REASONS:
        from accel.patching.builtin import op_reason

        _REASONS[key] = op_reason(op, device, dtype)
    return _REASONS[key]


def _same_device(*tensors: Optional[Tensor]) -> bool:
    device = tensors[0].device
    return all(t is None or t.device == device for t in tensors[1:])


def _depthwise_ok(hidden_states: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """The shapes and dtypes transformers' functions take, as a depthwise conv accel can run."""
    if hidden_states.dim() != 3 or weight.dim() != 2 or weight.shape[0] != hidden_states.shape[1]:
        return False
    if bias is not None and (bias.dim() != 1 or bias.dtype != weight.dtype):
        return False
    return weight.is_floating_point() and hidden_states.is_floating_point()


def _update(original: Callable[..., Tensor], hidden_states: Tensor, conv_state: Tensor, weight: Tensor,
            bias: Optional[Tensor] = None, activation: Optional[str] = None, **kwargs) -> Tensor:
    """transformers' ``causal_conv1d_update``: ``hidden_states`` ``(B, C, h)`` continued from ``conv_state``
    ``(B, C, state_len)`` (updated in place to the last ``state_len`` samples), depthwise ``weight`` ``(C, K)``.
    Computed in ``weight``'s dtype and returned in ``hidden_states``' dtype, as the original does."""
    act = _ACTIVATIONS.get(activation, "") if activation is None or isinstance(activation, str) else ""
    if (kwargs or act == "" or not _depthwise_ok(hidden_states, weight, bias) or conv_state.dim() != 3
            or conv_state.shape[0] != hidden_states.shape[0] or conv_state.shape[1] != hidden_states.shape[1]
            or conv_state.shape[2] < weight.shape[1] - 1 or conv_state.dtype != weight.dtype
            or not conv_state.is_contiguous() or not _same_device(weight, hidden_states, conv_state, bias)
            or _reason("streaming_conv1d", weight.device, weight.dtype) is not None):
        return original(hidden_states, conv_state, weight, bias, activation=activation, **kwargs)
    # The original casts cat(conv_state, x) to weight's dtype; with the state already in it, casting x is the same.
    x = hidden_states if hidden_states.dtype == weight.dtype else hidden_states.to(weight.dtype)
    out = _ops.streaming_conv1d(x, conv_state, weight.unsqueeze(1), bias, groups=weight.shape[0], activation=act)
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def _fn(original: Callable[..., Tensor], hidden_states: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
        activation: Optional[str] = None, **kwargs) -> Tensor:
    """transformers' ``causal_conv1d_fn``: the causal depthwise conv of ``hidden_states`` ``(B, C, L)`` with
    ``weight`` ``(C, K)``, computed in ``weight``'s dtype, returned in ``hidden_states``' dtype. Other keyword
    arguments (the layer's, passed through) are ignored as the original ignores them."""
    act = _ACTIVATIONS.get(activation, "") if activation is None or isinstance(activation, str) else ""
    packed = any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _CONV_FN_ONLY)
    if (packed or act == "" or not _depthwise_ok(hidden_states, weight, bias)
            or not _same_device(weight, hidden_states, bias)
            or _reason("dilated_conv1d", weight.device, weight.dtype) is not None):
        return original(hidden_states, weight, bias, activation=activation, **kwargs)
    x = hidden_states if hidden_states.dtype == weight.dtype else hidden_states.to(weight.dtype)
    out = _ops.dilated_conv1d(x, weight.unsqueeze(1), bias, padding="causal", groups=weight.shape[0],
                              activation=act)
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def _replacements(originals: Dict[str, Any]) -> Dict[str, Callable[..., Tensor]]:
    update_original, fn_original = originals[UPDATE], originals[FN]

    # Plain closures (no functools.wraps: a copied __module__ or __wrapped__ would pass them off as the originals).
    def causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None, **kwargs):
        return _update(update_original, hidden_states, conv_state, weight, bias, activation, **kwargs)

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        return _fn(fn_original, hidden_states, weight, bias, activation, **kwargs)

    for function, original in ((causal_conv1d_update, update_original), (causal_conv1d_fn, fn_original)):
        function.__doc__ = f"accel's replacement of {getattr(original, '__module__', '?')}.{function.__name__}"
        function.accel_original = original
    return {UPDATE: causal_conv1d_update, FN: causal_conv1d_fn}


# ---------------------------------------------------------------- per-module replacement, reference-counted

@dataclass(eq=False)
class _Routing:
    namespace: types.ModuleType
    originals: Dict[str, Any]
    replacements: Dict[str, Callable[..., Tensor]]
    holders: int = 0
    released: set = field(default_factory=set)


_lock = threading.Lock()
_routings: Dict[str, _Routing] = {}  # modeling module name -> its replacement while any layer holds it


def routed_modules() -> Dict[str, int]:
    """The modeling modules whose causal conv currently runs through accel, with how many layers hold each."""
    with _lock:
        return {name: r.holders for name, r in _routings.items()}


def namespace_of(module: nn.Module) -> Optional[types.ModuleType]:
    """The Python module defining ``module``'s class, if it defines the three causal-conv functions and the class
    calls ``causal_conv1d_forward``."""
    cls = type(module)
    namespace = sys.modules.get(cls.__module__)
    if namespace is None or not all(callable(getattr(namespace, name, None)) for name in (UPDATE, FN, FORWARD)):
        return None
    return namespace if _calls_forward(cls) else None


_calls: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()


def _names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions and comprehensions
            yield from _names(const)


def _calls_forward(cls: type) -> bool:
    """Whether a method of ``cls`` (or of a base defined in the same module) names ``causal_conv1d_forward``:
    other layers of these modules hold depthwise convs they run themselves (e.g. Qwen4-Exp's dilated PLE conv)."""
    if cls not in _calls:
        found = False
        for klass in cls.__mro__:
            if klass.__module__ != cls.__module__:
                continue
            for member in vars(klass).values():
                try:  # through functools.wraps decorators (transformers' and kernels' wrap forward)
                    code = getattr(inspect.unwrap(getattr(member, "__func__", member)), "__code__", None)
                except Exception:  # an attribute with a cyclic or odd __wrapped__ is not a method
                    continue
                if isinstance(code, types.CodeType) and FORWARD in _names(code):
                    found = True
                    break
            if found:
                break
        _calls[cls] = found
    return _calls[cls]


def conv_child(module: nn.Module) -> Optional[nn.Conv1d]:
    """``module``'s depthwise ``nn.Conv1d`` child (the conv the layer passes to ``causal_conv1d_forward``)."""
    for child in module._modules.values():
        if isinstance(child, nn.Conv1d) and child.groups == child.in_channels == child.out_channels:
            return child
    return None


def _acquire(namespace: types.ModuleType) -> Callable[[], None]:
    with _lock:
        routing = _routings.get(namespace.__name__)
        if routing is not None and routing.namespace is not namespace:  # the module was reloaded since
            routing = None
        if routing is None:
            originals = {name: getattr(namespace, name) for name in _REPLACED}
            routing = _Routing(namespace, originals, _replacements(originals))
            for name, function in routing.replacements.items():
                setattr(namespace, name, function)
            _routings[namespace.__name__] = routing
        routing.holders += 1
        token = object()

    def release() -> None:
        with _lock:
            # Idempotent: a deep copy of a patched model carries this same closure in its undo log.
            if token in routing.released:
                return
            routing.released.add(token)
            routing.holders -= 1
            if routing.holders > 0:
                return
            if _routings.get(namespace.__name__) is routing:
                del _routings[namespace.__name__]
            changed = []
            for name, original in routing.originals.items():
                if getattr(namespace, name, None) is routing.replacements[name]:
                    setattr(namespace, name, original)
                else:  # someone replaced it again since: theirs wins
                    changed.append(name)
        if changed:
            warnings.warn(f"accel.unpatch: {namespace.__name__}.{', '.join(changed)} changed after patch; "
                          "left as it is", PatchWarning, stacklevel=3)

    return release


# ---------------------------------------------------------------- the rule

def _check(module: nn.Module) -> Optional[str]:
    conv = conv_child(module)
    weight = conv.weight
    decode = _reason("streaming_conv1d", weight.device, weight.dtype)
    prefill = _reason("dilated_conv1d", weight.device, weight.dtype)
    if decode is not None and prefill is not None:
        return decode if decode == prefill else f"{decode}; {prefill}"
    return None


def _apply(module: nn.Module) -> Callable[[], None]:
    prepare([conv_child(module).weight.device])
    return _acquire(namespace_of(module))


class _ByModelingModule(Rule):
    """A method-patch rule that matches modules by where their class is defined (see the module docstring):
    the classes it applies to are not known in advance, so it overrides ``matches`` instead of naming them."""

    def matches(self, module: nn.Module) -> bool:
        return namespace_of(module) is not None and conv_child(module) is not None

    def matches_subclass_only(self, module: nn.Module) -> bool:
        return False


CAUSAL_CONV_RULE = _ByModelingModule(
    name="transformers: causal conv1d -> streaming_conv1d",
    op="streaming_conv1d",
    classes=(nn.Module,),  # nominal: matches() decides
    subclasses=True,
    check=_check,
    apply=_apply,
    description="hybrid SSM / linear-attention layers: their modeling module's causal_conv1d_update -> "
                "accel.ops.streaming_conv1d (decode) and causal_conv1d_fn -> accel.ops.dilated_conv1d (prefill), "
                "activation fused; per modeling module, reference-counted; falls back to the originals",
)
