"""Plugin discovery through the ``accel.plugins`` entry-point group.

A distribution declares, e.g. in pyproject.toml::

    [project.entry-points."accel.plugins"]
    myplug = "myplug:plugin"          # a Plugin object, or a zero-argument callable returning one

``ACCEL_PLUGINS`` (comma-separated allow list of entry-point names, globs allowed) and
``ACCEL_DISABLE_PLUGINS`` (block list) decide which are loaded. A plugin that fails to load is
reported with its name and the error; it never stops the others or the built-in rules.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata as metadata
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from accel.patching.rules import Rule

GROUP = "accel.plugins"
ALLOW_ENV = "ACCEL_PLUGINS"
BLOCK_ENV = "ACCEL_DISABLE_PLUGINS"


@dataclass
class Plugin:
    """What a plugin contributes: replacement ``rules`` and ``method_patches`` (rules with ``apply``).

    ``requires`` holds distribution requirements (``"transformers>=5"``); when one is unmet the
    plugin is skipped and says which.
    """

    name: str
    requires: Sequence[str] = ()
    rules: Sequence[Rule] = ()
    method_patches: Sequence[Rule] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.requires, str):
            self.requires = (self.requires,)
        self.requires = tuple(self.requires)
        self.rules = list(self.rules)
        self.method_patches = list(self.method_patches)
        for rule in self.rules:
            if not isinstance(rule, Rule) or rule.kind != "replace":
                raise TypeError(f"Plugin {self.name!r}: rules must be Rules with build=, got {rule!r}")
        for rule in self.method_patches:
            if not isinstance(rule, Rule) or rule.kind != "method":
                raise TypeError(f"Plugin {self.name!r}: method_patches must be Rules with apply=, got {rule!r}")

    def all_rules(self) -> List[Rule]:
        return [*self.rules, *self.method_patches]


@dataclass(frozen=True)
class PluginStatus:
    """One discovered entry point and what became of it.

    ``status`` is ``"loaded"``, ``"disabled by ACCEL_DISABLE_PLUGINS"``, ``"not in ACCEL_PLUGINS"``,
    ``"skipped: needs ..."`` or ``"error: <exception>"`` (only errors warn, and raise under strict).
    """

    name: str
    status: str
    target: str = ""
    distribution: str = ""
    plugin: Optional[Plugin] = field(default=None, compare=False)

    @property
    def loaded(self) -> bool:
        return self.status == "loaded"

    @property
    def failed(self) -> bool:
        return self.status.startswith("error:")

    def __str__(self) -> str:
        where = f" ({self.target}, {self.distribution})" if self.target else ""
        return f"{self.name}: {self.status}{where}"


# ---------------------------------------------------------------- requirements

_SPEC = re.compile(r"\s*(~=|===|==|!=|<=|>=|<|>)\s*([^\s,;]+)\s*")


def _version_tuple(v: str) -> Tuple[int, ...]:
    parts = []
    for piece in v.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _simple_satisfies(found: str, spec: str) -> bool:
    """Fallback for a missing ``packaging``: numeric release comparison, ``==X.*`` prefixes."""
    f = _version_tuple(found)
    for m in _SPEC.finditer(spec):
        op, want = m.group(1), m.group(2)
        if want.endswith(".*"):
            prefix = _version_tuple(want[:-2])
            ok = f[: len(prefix)] == prefix
            if (op in ("==", "===") and not ok) or (op == "!=" and ok):
                return False
            continue
        w = _version_tuple(want)
        n = max(len(f), len(w))
        fp, wp = f + (0,) * (n - len(f)), w + (0,) * (n - len(w))
        ok = {
            "==": fp == wp, "===": found == want, "!=": fp != wp, "<=": fp <= wp, ">=": fp >= wp,
            "<": fp < wp, ">": fp > wp, "~=": fp >= wp and f[: len(w) - 1] == w[:-1],
        }[op]
        if not ok:
            return False
    return True


def _parse_requirement(req: str) -> Tuple[str, str, bool]:
    """Return ``(distribution, specifier text, applies)``; ``applies`` is False when a marker excludes it."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)", req)
        if not m:
            raise ValueError(f"invalid requirement {req!r}")
        return m.group(1), m.group(2).strip(), True
    r = Requirement(req)  # raises InvalidRequirement (a ValueError) with a clear message
    return r.name, str(r.specifier), r.marker is None or r.marker.evaluate()


def unmet_requirement(req: str) -> Optional[str]:
    """``None`` if ``req`` is satisfied, else ``"needs <req> (found X / not installed)"``."""
    name, spec, applies = _parse_requirement(req)
    if not applies:
        return None
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        return f"needs {req} (not installed)"
    try:
        from packaging.specifiers import SpecifierSet

        ok = SpecifierSet(spec).contains(found, prereleases=True)
    except ImportError:
        ok = _simple_satisfies(found, spec)
    return None if ok else f"needs {req} (found {found})"


# ---------------------------------------------------------------- discovery

def _env_list(var: str) -> Optional[List[str]]:
    raw = os.environ.get(var, "").strip()
    return [s.strip() for s in raw.split(",") if s.strip()] if raw else None


def _listed(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _load(ep: metadata.EntryPoint) -> Tuple[str, Optional[Plugin]]:
    try:
        obj = ep.load()
        if not isinstance(obj, Plugin) and callable(obj):
            obj = obj()
        if not isinstance(obj, Plugin):
            raise TypeError(f"entry point {ep.value!r} gave {type(obj).__name__}, expected an accel.patching.Plugin "
                            "or a zero-argument callable returning one")
        for req in obj.requires:
            unmet = unmet_requirement(req)
            if unmet:
                return f"skipped: {unmet}", None
    except Exception as e:  # a broken plugin must not break patch(): report it instead
        return f"error: {type(e).__name__}: {e}", None
    return "loaded", obj


def _discover(allow: Optional[List[str]], block: Optional[List[str]]) -> Tuple[PluginStatus, ...]:
    statuses: Dict[str, PluginStatus] = {}
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
        if ep.name in statuses:
            other = statuses[ep.name].distribution
            dup = f"{ep.name} ({dist})"
            statuses[dup] = PluginStatus(
                dup, f"error: duplicate entry-point name (also provided by {other})", ep.value, dist)
            continue
        if block is not None and _listed(ep.name, block):
            status, plugin = f"disabled by {BLOCK_ENV}", None
        elif allow is not None and not _listed(ep.name, allow):
            status, plugin = f"not in {ALLOW_ENV}", None
        else:
            status, plugin = _load(ep)
        statuses[ep.name] = PluginStatus(ep.name, status, ep.value, dist, plugin)
    for name in allow or ():  # asked for by name but absent: say so rather than ignore it
        if not any(ch in name for ch in "*?[") and name not in statuses:
            statuses[name] = PluginStatus(name, f"error: named in {ALLOW_ENV} but no such entry point is installed")
    return tuple(statuses.values())


_cache: Dict[tuple, Tuple[PluginStatus, ...]] = {}


def list_plugins(refresh: bool = False) -> List[PluginStatus]:
    """Every discovered plugin with its status; loads those the env vars allow.

    Cached per (``ACCEL_PLUGINS``, ``ACCEL_DISABLE_PLUGINS``, ``sys.path``), so changing either
    variable or the path takes effect at the next call; ``refresh=True`` rescans regardless
    (e.g. after installing a plugin in a running process).
    """
    allow, block = _env_list(ALLOW_ENV), _env_list(BLOCK_ENV)
    key = (tuple(allow or ()) if allow is not None else None, tuple(block or ()), tuple(sys.path))
    if refresh or key not in _cache:
        _cache.clear()
        _cache[key] = _discover(allow, block)
    return list(_cache[key])


def plugin_rules(statuses: Sequence[PluginStatus]) -> List[Rule]:
    return [rule for s in statuses if s.plugin is not None for rule in s.plugin.all_rules()]
