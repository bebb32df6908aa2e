"""Import every built-in method module so that each registers itself."""
import importlib
import pkgutil

from .. import methods as _pkg

for _m in pkgutil.iter_modules(_pkg.__path__):
    if not _m.name.startswith("_") and _m.name != "base":
        importlib.import_module(f"{_pkg.__name__}.{_m.name}")
importlib.import_module("fewstep.teachers.training")
