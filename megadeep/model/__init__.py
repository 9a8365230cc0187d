"""The Llama-style decoder, written once; pipeline and parallel forms are derived from it.

The model classes load on first use (PEP 562): ``megadeep.model.accounting`` is plain Python that
the planner and the launcher's checks use, and must not wait for torch to import.
"""
import importlib

_EXPORTS = {"Block": "llama", "Transformer": "llama", "init_weights": "llama", "num_params": "accounting"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megadeep.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megadeep.model' has no attribute '{name}'")
