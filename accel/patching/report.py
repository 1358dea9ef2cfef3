"""PatchReport: what patch() replaced, patched and skipped, and why."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from torch import nn


@dataclass(frozen=True)
class Replaced:
    path: str
    original: str  # class name of the module that was swapped out
    new: str  # class name of its replacement
    rule: str


@dataclass(frozen=True)
class MethodPatched:
    path: str
    class_name: str
    rule: str


@dataclass(frozen=True)
class Skipped:
    path: str
    class_name: str
    reason: str


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> List[str]:
    """Left-aligned columns; the last column is not padded (reasons can be long)."""
    cells = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    lines = []
    for row in cells:
        head = "  ".join(c.ljust(w) for c, w in zip(row, widths))
        lines.append((indent + head + "  " + row[-1]).rstrip())
    return lines


def _path(p: str) -> str:
    return p or "<model>"


@dataclass
class PatchReport:
    """The outcome of one :func:`accel.patch` call. ``len(report)`` is the number of changes.

    ``model`` is the patched model (the copy when ``inplace=False``); ``plugins`` maps each
    discovered plugin's entry-point name to ``"loaded"`` or why not; ``disabled`` is set when the
    whole call was a no-op (``ACCEL_DISABLE``).
    """

    model: Optional[nn.Module]
    replaced: List[Replaced] = field(default_factory=list)
    patched_methods: List[MethodPatched] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    plugins: Dict[str, str] = field(default_factory=dict)
    disabled: Optional[str] = None

    def __len__(self) -> int:
        return len(self.replaced) + len(self.patched_methods)

    def summary(self) -> str:
        if self.disabled:
            return f"accel.patch: nothing changed ({self.disabled})"
        loaded = sum(1 for s in self.plugins.values() if s == "loaded")
        return (f"accel.patch: {len(self.replaced)} replaced, {len(self.patched_methods)} methods patched, "
                f"{len(self.skipped)} skipped; plugins: {loaded} loaded of {len(self.plugins)}")

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.replaced:
            lines.append(f"Replaced ({len(self.replaced)})")
            lines += _table(("path", "from", "to", "rule"),
                            [(_path(e.path), e.original, e.new, e.rule) for e in self.replaced])
        if self.patched_methods:
            lines.append(f"Patched methods ({len(self.patched_methods)})")
            lines += _table(("path", "class", "rule"),
                            [(_path(e.path), e.class_name, e.rule) for e in self.patched_methods])
        if self.skipped:
            lines.append(f"Skipped ({len(self.skipped)})")
            lines += _table(("path", "class", "reason"),
                            [(_path(e.path), e.class_name, e.reason) for e in self.skipped])
        lines.append(f"Plugins ({len(self.plugins)})")
        if self.plugins:
            lines += _table(("name", "status"), sorted(self.plugins.items()))
        else:
            lines.append("  none discovered (entry-point group accel.plugins)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PatchReport(replaced={len(self.replaced)}, patched_methods={len(self.patched_methods)}, "
                f"skipped={len(self.skipped)}, plugins={len(self.plugins)}"
                + (f", disabled={self.disabled!r}" if self.disabled else "") + ")")

    def to_dict(self) -> dict:
        """JSON-friendly form (without the model)."""
        return {
            "replaced": [asdict(e) for e in self.replaced],
            "patched_methods": [asdict(e) for e in self.patched_methods],
            "skipped": [asdict(e) for e in self.skipped],
            "plugins": dict(self.plugins),
            "disabled": self.disabled,
        }
