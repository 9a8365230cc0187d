"""The Llama-style decoder, written once; pipeline and parallel forms are derived from it.

The model classes load on first use (PEP 562): ``megadeep.model.accounting`` is plain Python that
the planner and the launcher's checks use, and must not wait for torch to import.
"""
from megadeep.lazy import lazy_exports

_EXPORTS = {"Block": "llama", "Transformer": "llama", "init_weights": "llama", "num_params": "accounting"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
