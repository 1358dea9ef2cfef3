"""Pure-PyTorch references: the test oracle for every op (one module per op, named as in accel.ops)."""
import importlib as _importlib
import pkgutil as _pkgutil

__all__ = []
for _info in _pkgutil.iter_modules(__path__):
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    globals().update({_name: getattr(_module, _name) for _name in _module.__all__})
    __all__ += _module.__all__
