"""Every ACCEL_ name the sources use is documented in docs/environment.md (no hidden knobs)."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ("csrc", "accel", "plugins")
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh"}


def _names_in_sources():
    names = {}
    for top in SOURCES:
        for path in (ROOT / top).rglob("*"):
            if path.suffix in SUFFIXES and path.is_file():
                for name in re.findall(r"\bACCEL_[A-Z0-9_]+", path.read_text(errors="ignore")):
                    names.setdefault(name, str(path.relative_to(ROOT)))
    return names


def test_every_accel_name_is_in_the_environment_table():
    documented = set(re.findall(r"`(ACCEL_[A-Z0-9_]+)`", (ROOT / "docs" / "environment.md").read_text()))
    names = _names_in_sources()
    assert names, "found no ACCEL_ name at all: the scan is broken"
    missing = {n: where for n, where in names.items() if n not in documented}
    assert not missing, f"ACCEL_ names used but not in docs/environment.md: {missing}"


def test_environment_variables_are_read_in_known_places():
    """getenv in the native code only for the documented user switch and test hooks."""
    readers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                     if p.is_file() and "getenv" in p.read_text(errors="ignore"))
    assert readers == ["csrc/common/cpu_memory.cpp", "csrc/common/test_hooks.h"], readers
