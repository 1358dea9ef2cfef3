"""accel: native CPU and CUDA kernels behind drop-in nn.Module replacements.

    import accel
    report = accel.patch(model)     # swap supported layers for accel's, per instance
    print(report)
    accel.unpatch(model)            # restore the originals exactly

Submodules: ``accel.ops`` (functional ops), ``accel.nn`` (modules), ``accel.reference``
(pure-PyTorch oracles), ``accel.bench`` (``python -m accel.bench``), ``accel.info``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from accel.patching import PatchReport, patch, unpatch  # noqa: E402

# Imported on first use: accel.ops/nn need the native extension, and importing accel.info here
# would make ``python -m accel.info`` warn about a module imported twice.
_SUBMODULES = ("ops", "nn", "reference", "bench", "patching", "info")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"accel.{name}")
    raise AttributeError(f"module 'accel' has no attribute {name!r}")


__all__ = ["patch", "unpatch", "PatchReport", "info", "__version__"]
