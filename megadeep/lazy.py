"""Package exports that load on first use (PEP 562): plain-Python submodules that the launcher's
checks and the planner import (layouts, accounting, the stage cut) must not wait for torch or
DeepSpeed to import."""
import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` resolving each name of ``exports`` (name → submodule).
    Once a submodule is imported its exports are bound on the package: importing a submodule named
    like an export (``pipeline.topology``) binds that name to the module, and this rebinds it."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        where = exports[name]
        module = importlib.import_module(f"{package}.{where}")
        vars(sys.modules[package]).update({n: getattr(module, n) for n, w in exports.items() if w == where})
        return getattr(module, name)
    return __getattr__
