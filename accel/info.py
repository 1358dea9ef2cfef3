"""``python -m accel.info``: print what this accel build contains.

The module is callable, so ``accel.info()`` works whether ``accel.info`` was reached as the
package attribute or imported as this submodule.
"""
import sys
import types

from accel._info import format_info, info, kernel_table  # noqa: F401


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return info(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    info()
