"""What a patch rule is, the programmatic rule registry, and a helper for per-instance method patches."""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple, Union

from torch import nn

# A rule names the classes it matches either by the class itself or by its dotted path
# ("transformers.models.llama.modeling_llama.LlamaAttention"), so a plugin can match a class
# without importing the library that defines it.
ClassSpec = Union[type, str]
Check = Callable[[nn.Module], Optional[str]]
Build = Callable[[nn.Module], nn.Module]
Apply = Callable[[nn.Module], Callable[[], None]]


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(cls: type, spec: ClassSpec) -> bool:
    return cls is spec if isinstance(spec, type) else class_path(cls) == spec


@dataclass(frozen=True)
class Rule:
    """One way to accelerate one kind of module, applied per instance.

    Exactly one of ``build`` (returns a replacement module that ``patch`` swaps into the parent,
    typically ``Replacement.from_module(m)``) and ``apply`` (patches the instance in place, e.g.
    with :func:`bind_method`, and returns a zero-argument callable that undoes it) is given.

    ``check(module)`` returns why this module must be left alone (``None``: go ahead). A rule
    matches ``type(module)`` exactly unless ``subclasses=True``: a subclass may override
    ``forward``, and a replacement would silently drop that.

    ``changes_math=True`` marks an opt-in conversion that changes outputs (e.g. softmax ->
    sigmoid attention); it runs only when ``patch(convert={key: value})`` names it, where
    ``(key, value)`` is ``conversion`` (default ``(name, True)``).
    """

    name: str
    op: str
    classes: Tuple[ClassSpec, ...]
    check: Optional[Check] = None
    build: Optional[Build] = None
    apply: Optional[Apply] = None
    subclasses: bool = False
    changes_math: bool = False
    conversion: Optional[Tuple[str, Any]] = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.op:
            raise ValueError("Rule: name and op must be non-empty strings")
        classes = self.classes if isinstance(self.classes, (tuple, list)) else (self.classes,)
        if not classes or not all(isinstance(c, (type, str)) for c in classes):
            raise TypeError(f"Rule {self.name!r}: classes must be classes or dotted class paths, got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(classes))
        if (self.build is None) == (self.apply is None):
            raise ValueError(f"Rule {self.name!r}: give exactly one of build= (replacement) and apply= (method patch)")
        if self.conversion is not None and not self.changes_math:
            raise ValueError(f"Rule {self.name!r}: conversion= only applies to rules with changes_math=True")

    @property
    def kind(self) -> str:
        return "replace" if self.build is not None else "method"

    @property
    def conversion_key(self) -> Tuple[str, Any]:
        return self.conversion if self.conversion is not None else (self.name, True)

    def class_names(self) -> str:
        return ", ".join(c.__name__ if isinstance(c, type) else c.rsplit(".", 1)[-1] for c in self.classes)

    def matches(self, module: nn.Module) -> bool:
        """Whether this rule is meant for ``module`` (exact class, or any subclass if allowed)."""
        mro = type(module).__mro__ if self.subclasses else (type(module),)
        return any(_same_class(cls, spec) for cls in mro for spec in self.classes)

    def matches_subclass_only(self, module: nn.Module) -> bool:
        """``module`` is a strict subclass of a matched class that this rule declines to capture."""
        if self.subclasses or self.matches(module):
            return False
        return any(_same_class(cls, spec) for cls in type(module).__mro__[1:] for spec in self.classes)


def bind_method(module: nn.Module, name: str, function: Callable[..., Any]) -> Callable[[], None]:
    """Bind ``function`` as method ``name`` of this one instance; return the undo callable.

    Only the instance's ``__dict__`` changes, never the class, so other instances of the same
    class are unaffected (``torch.compile`` sees the rebinding too).
    """
    had = name in module.__dict__
    previous = module.__dict__.get(name)
    module.__dict__[name] = types.MethodType(function, module)

    def undo() -> None:
        if had:
            module.__dict__[name] = previous
        else:
            module.__dict__.pop(name, None)

    return undo


# ---------------------------------------------------------------- programmatic registry

_registered: List[Rule] = []


def register_rule(rule: Rule, *, replace: bool = False) -> Rule:
    """Add a rule for every later ``patch`` call; it takes precedence over plugin and built-in rules."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects an accel.patching.Rule, got {type(rule).__name__}")
    for i, existing in enumerate(_registered):
        if existing.name == rule.name:
            if not replace:
                raise ValueError(f"a rule named {rule.name!r} is already registered (pass replace=True)")
            _registered[i] = rule
            return rule
    _registered.append(rule)
    return rule


def unregister_rule(rule: Union[Rule, str]) -> bool:
    """Remove a registered rule (by object or name); return whether it was there."""
    name = rule.name if isinstance(rule, Rule) else rule
    for i, existing in enumerate(_registered):
        if existing.name == name:
            del _registered[i]
            return True
    return False


def registered_rules() -> List[Rule]:
    return list(_registered)
