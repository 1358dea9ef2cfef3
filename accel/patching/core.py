"""patch() and unpatch(): apply rules per module instance, record how to undo them."""
from __future__ import annotations

import copy
import fnmatch
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

from torch import nn

from accel.patching.builtin import builtin_rules
from accel.patching.plugins import list_plugins, plugin_rules
from accel.patching.report import MethodPatched, PatchReport, Replaced, Skipped
from accel.patching.rules import Rule, registered_rules

DISABLE_ENV = "ACCEL_DISABLE"
# The undo log lives on the model itself so unpatch() works long after patch() returned, and
# deepcopy/pickle of a patched model carry it along consistently.
_STATE_ATTR = "_accel_patch_state"

Slot = Tuple[nn.Module, str]  # (parent, child name)


class PatchWarning(UserWarning):
    """A plugin or rule failed and was skipped (``strict=True`` raises instead)."""


@dataclass(eq=False)
class _Change:
    path: str
    original: nn.Module
    rule: str
    replacement: Optional[nn.Module] = None
    slots: List[Slot] = field(default_factory=list)
    undo: Optional[Callable[[], None]] = None

    def revert(self) -> None:
        if self.undo is not None:
            self.undo()
            return
        assert self.replacement is not None
        _carry_back_tensors(self.replacement, self.original)
        for parent, name in self.slots:
            if parent._modules.get(name) is self.replacement:
                setattr(parent, name, self.original)
            else:  # the user swapped it again since: theirs wins
                warnings.warn(f"accel.unpatch: {self.path or name!r} changed after patch; left as it is", PatchWarning)


@dataclass(eq=False)
class _PatchState:
    changes: List[_Change] = field(default_factory=list)

    def replacement_ids(self) -> Set[int]:
        return {id(c.replacement) for c in self.changes if c.replacement is not None}

    def method_patched_ids(self) -> Set[int]:
        return {id(c.original) for c in self.changes if c.undo is not None}


def _carry_back_tensors(src: nn.Module, dst: nn.Module) -> None:
    """Replacements share their parameters with the original; if the user re-assigned one since
    (``load_state_dict(assign=True)``, ``to_empty``), give the original the current tensor."""
    for store in ("_parameters", "_buffers"):
        s, d = getattr(src, store), getattr(dst, store)
        for name, tensor in s.items():
            if name in d and tensor is not None and d[name] is not tensor:
                d[name] = tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The module to patch: ``torch.compile``'s OptimizedModule wraps the real one in ``_orig_mod``."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported iff anything was compiled
    optimized = getattr(eval_frame, "OptimizedModule", None)
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def active_rules() -> List[Rule]:
    """Rules in precedence order: registered with register_rule(), then plugins', then built-in."""
    return [*registered_rules(), *plugin_rules(list_plugins()), *builtin_rules()]


def _parent_slots(root: nn.Module) -> Dict[int, List[Slot]]:
    """Every (parent, name) holding each module: a module shared by two parents is swapped in both."""
    slots: Dict[int, List[Slot]] = {}
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, name))
    return slots


def _hook_reason(module: nn.Module) -> Optional[str]:
    kinds = [label for attr, label in (
        ("_forward_pre_hooks", "forward pre-hooks (e.g. torch.nn.utils.weight_norm)"),
        ("_forward_hooks", "forward hooks"),
        ("_backward_pre_hooks", "backward pre-hooks"),
        ("_backward_hooks", "backward hooks"),
    ) if getattr(module, attr, None)]
    return f"has {', '.join(kinds)}; a replacement would drop them" if kinds else None


def _as_set(v: Union[None, str, Iterable[str]]) -> Optional[Set[str]]:
    if v is None:
        return None
    return {v} if isinstance(v, str) else set(v)


@dataclass
class _Selection:
    """ops= / exclude= / convert= resolved against the active rules."""

    ops: Optional[Set[str]]
    exclude_rules: Set[str]  # op or rule names
    exclude_paths: List[str]
    convert: Mapping[str, Any]

    @classmethod
    def make(cls, rules: List[Rule], ops, exclude, convert) -> "_Selection":
        known_ops = {r.op for r in rules}
        ops_set = _as_set(ops)
        if ops_set is not None and ops_set - known_ops:
            raise ValueError(f"accel.patch: unknown op(s) {sorted(ops_set - known_ops)}; known: {sorted(known_ops)} "
                             "(ops from plugins count only when the plugin is loaded: see list_plugins())")
        names = known_ops | {r.name for r in rules}
        excl = _as_set(exclude) or set()
        convert = dict(convert or {})
        known_conv = {r.conversion_key[0] for r in rules if r.changes_math}
        if set(convert) - known_conv:
            raise ValueError(f"accel.patch: unknown conversion(s) {sorted(set(convert) - known_conv)}; "
                             f"known: {sorted(known_conv)}")
        return cls(ops_set, excl & names, sorted(excl - names), convert)

    def path_excluded(self, path: str) -> Optional[str]:
        for pat in self.exclude_paths:
            if path == pat or path.startswith(pat + ".") or fnmatch.fnmatchcase(path, pat):
                return f"excluded by exclude={pat!r}"
        return None

    def rule_reason(self, rule: Rule) -> Optional[str]:
        if rule.op in self.exclude_rules or rule.name in self.exclude_rules:
            return f"excluded (op {rule.op!r})"
        if self.ops is not None and rule.op not in self.ops:
            return f"op {rule.op!r} not selected by ops={sorted(self.ops)}"
        if rule.changes_math:
            key, value = rule.conversion_key
            if key not in self.convert or self.convert[key] != value:
                return f"changes the maths: opt in with convert={{{key!r}: {value!r}}}"
        return None


def _decide(path: str, module: nn.Module, rules: List[Rule], sel: _Selection) -> Tuple[Optional[Rule], Optional[str]]:
    """The first rule that applies to ``module``, else why not; (None, None) if no rule is about it."""
    candidates = [r for r in rules if r.matches(module)]
    if not candidates:
        near = next((r for r in rules if r.matches_subclass_only(module)), None)
        if near is None:
            return None, None
        if type(module).__module__.split(".")[0] == "accel":
            return None, "already an accel module"
        return None, (f"{type(module).__name__} subclasses {near.class_names()}; rule {near.name} matches the exact "
                      "class only (a subclass may change forward)")
    excluded = sel.path_excluded(path)
    if excluded:
        return None, excluded
    reasons: List[Tuple[Rule, str]] = []
    for rule in candidates:
        reason = sel.rule_reason(rule)
        if reason is None and rule.kind == "replace":
            if path == "":
                reason = "is the model itself: a module cannot replace itself in place; patch a container holding it"
            else:
                reason = _hook_reason(module)
        if reason is None and rule.check is not None:
            try:
                reason = rule.check(module)
            except Exception as e:  # a buggy check skips its rule, it does not abort patch()
                reason = f"rule check raised {type(e).__name__}: {e}"
        if reason is None:
            return rule, None
        reasons.append((rule, reason))
    if len(reasons) == 1:
        return None, reasons[0][1]
    return None, "; ".join(f"{r.name}: {why}" for r, why in reasons)


def _apply(rule: Rule, path: str, module: nn.Module, slots: List[Slot]) -> _Change:
    if rule.build is not None:
        new = rule.build(module)
        if not isinstance(new, nn.Module) or new is module:
            raise TypeError(f"build returned {type(new).__name__}, expected a new nn.Module")
        for parent, name in slots:
            setattr(parent, name, new)
        return _Change(path, module, rule.name, replacement=new, slots=list(slots))
    assert rule.apply is not None
    undo = rule.apply(module)
    if not callable(undo):
        raise TypeError(f"apply returned {type(undo).__name__}, expected an undo callable")
    return _Change(path, module, rule.name, undo=undo)


def patch(
    model: nn.Module,
    *,
    ops: Union[None, str, Iterable[str]] = None,
    exclude: Union[None, str, Iterable[str]] = None,
    strict: bool = False,
    inplace: bool = True,
    convert: Optional[Mapping[str, Any]] = None,
    fuse_bn: bool = False,
) -> PatchReport:
    """Swap accel's kernels into ``model``, one module instance at a time; return what was done.

    Args:
        model: any ``nn.Module``, also a ``torch.compile``'d one (its ``_orig_mod`` is patched).
        ops: only use these accel ops (e.g. ``{"dilated_conv1d"}``); unknown names raise.
        exclude: op or rule names, and module paths (a path excludes its subtree; globs allowed).
        strict: raise RuntimeError when a plugin fails to load or a rule fails, instead of warning.
        inplace: False patches a deep copy and leaves ``model`` untouched.
        convert: opt-in conversions that change the maths, e.g. ``{"attention": "sigmoid"}``.
        fuse_bn: fold each BatchNorm (in eval mode) that directly follows a convolution in an
            ``nn.Sequential`` into that convolution, before the other rules run (inference only).

    Returns:
        A :class:`PatchReport`; ``report.model`` is the patched model. ``accel.unpatch`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accel.patch expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if _disabled():
        return PatchReport(model=model, disabled=f"disabled by {DISABLE_ENV}")

    statuses = list_plugins()
    report = PatchReport(model=model, plugins={s.name: s.status for s in statuses})
    for s in statuses:
        if s.failed:
            if strict:
                raise RuntimeError(f"accel.patch(strict=True): plugin {s.name!r} ({s.target}) failed: {s.status}")
            warnings.warn(f"accel plugin {s.name!r} ({s.target}) is skipped: {s.status}", PatchWarning, stacklevel=2)

    root = unwrap(model)
    rules = [*registered_rules(), *plugin_rules(statuses), *builtin_rules()]
    sel = _Selection.make(rules, ops, exclude, convert)
    state: _PatchState = root.__dict__.get(_STATE_ATTR) or _PatchState()
    replaced_ids, method_ids = state.replacement_ids(), state.method_patched_ids()
    slots = _parent_slots(root)
    new_changes: List[_Change] = []
    frozen: List[str] = []  # subtrees of replaced modules: never patched from outside
    if fuse_bn:
        new_changes += _fold_batchnorms(root, slots, replaced_ids | method_ids, report)
        slots = _parent_slots(root)

    for path, module in list(root.named_modules()):
        if any(path.startswith(p + ".") for p in frozen):
            continue
        if id(module) in replaced_ids or id(module) in method_ids:
            report.skipped.append(Skipped(path, type(module).__name__, "already patched"))
            if id(module) in replaced_ids:
                frozen.append(path)
            continue
        rule, reason = _decide(path, module, rules, sel)
        if rule is None:
            if reason is not None:
                report.skipped.append(Skipped(path, type(module).__name__, reason))
            continue
        try:
            change = _apply(rule, path, module, slots.get(id(module), []))
        except Exception as e:
            if strict:
                for done in reversed(new_changes):
                    done.revert()
                raise RuntimeError(f"accel.patch(strict=True): rule {rule.name!r} failed on {path!r}: "
                                   f"{type(e).__name__}: {e}") from e
            why = f"rule {rule.name} failed: {type(e).__name__}: {e}"
            warnings.warn(f"accel.patch: {path!r}: {why}; left unpatched", PatchWarning, stacklevel=2)
            report.skipped.append(Skipped(path, type(module).__name__, why))
            continue
        new_changes.append(change)
        if change.replacement is not None:
            frozen.append(path)
            report.replaced.append(Replaced(path, type(module).__name__, type(change.replacement).__name__, rule.name))
        else:
            report.patched_methods.append(MethodPatched(path, type(module).__name__, rule.name))

    if new_changes:
        state.changes.extend(new_changes)
        root.__dict__[_STATE_ATTR] = state
    return report


def _fold_batchnorms(root: nn.Module, slots: Dict[int, List[Slot]], patched: Set[int],
                     report: PatchReport) -> List[_Change]:
    """fuse_bn: each foldable (conv, BatchNorm) pair becomes (folded conv, Identity); the folded conv
    stays open to the rules that follow (a Conv1d may still become accel's)."""
    from accel.patching import fuse_bn

    shared = {i for i, s in slots.items() if len(s) > 1} | patched
    todo, skipped = fuse_bn.plan(root, shared)
    for path, why in skipped:
        report.skipped.append(Skipped(path, "BatchNorm", f"fuse_bn: {why}"))
    changes: List[_Change] = []
    for path, seq, a, b in todo:
        conv, norm = seq._modules[a], seq._modules[b]
        for name, old, new in ((a, conv, fuse_bn.fold(conv, norm)), (b, norm, nn.Identity())):
            full = f"{path}.{name}" if path else name
            setattr(seq, name, new)
            # an undo, not a replacement: the folded conv has new parameters, none to carry back
            changes.append(_Change(full, old, "fuse_bn", undo=_restore(seq, name, old, new, full)))
            report.replaced.append(Replaced(full, type(old).__name__, type(new).__name__, "fuse_bn"))
    return changes


def _restore(parent: nn.Module, name: str, original: nn.Module, replacement: nn.Module, path: str):
    def undo() -> None:
        if parent._modules.get(name) is replacement:
            setattr(parent, name, original)
        else:  # the user swapped it again since: theirs wins
            warnings.warn(f"accel.unpatch: {path!r} changed after patch; left as it is", PatchWarning)
    return undo


def unpatch(model: nn.Module) -> int:
    """Undo every ``patch`` on ``model``: the original module objects and methods come back
    (identity, not copies). Returns how many changes were undone (0 if it was not patched)."""
    root = unwrap(model)
    state: Optional[_PatchState] = root.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return 0
    for change in reversed(state.changes):
        change.revert()
    return len(state.changes)
