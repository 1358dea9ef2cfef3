"""The one place that loads the native extension ``accel._C``.

Importing ``accel._C`` registers every op with the dispatcher (``torch.ops.accel.*``). When the
extension is missing or broken, :func:`load` raises an ImportError that says how to build it,
instead of a later ``AttributeError: '_OpNamespace' 'accel' object has no attribute ...``.
"""
from __future__ import annotations

import functools

_BUILD_HINT = (
    "accel's native extension (accel._C) is not built or failed to load. Build it from the "
    "repository root with:\n"
    "    pip install -e . --no-build-isolation        (ACCEL_CUDA=0 for a CPU-only build)\n"
    "See docs/install.md."
)


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from accel import _C  # noqa: F401  (registers the ops)
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        return None, e
    return _C, None


def load():
    """Return the extension module, raising a clear ImportError if it is unavailable."""
    mod, err = _load()
    if mod is None:
        raise ImportError(f"{_BUILD_HINT}\nCause: {err}") from err
    return mod


def available() -> bool:
    return _load()[0] is not None


def load_error():
    return _load()[1]


def build_info() -> dict:
    return dict(load().build_info())
