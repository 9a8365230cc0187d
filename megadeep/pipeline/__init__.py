"""Pipeline parallelism: the Llama decoder cut into stages for DeepSpeed's pipeline engine.

The names below load on first use (PEP 562), so that ``megadeep.pipeline.partition`` — plain Python
the launcher's checks use before any rank starts — does not import DeepSpeed and torch.
"""
import importlib

_EXPORTS = {"PipelinedLlama": "stages", "layer_specs": "stages", "check_grid": "topology", "topology": "topology"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        where = _EXPORTS[name]
        module = importlib.import_module(f"megadeep.pipeline.{where}")
        # importing submodule ``topology`` binds that name to the module: rebind the exports after it
        globals().update({n: getattr(module, n) for n, w in _EXPORTS.items() if w == where})
        return globals()[name]
    raise AttributeError(f"module 'megadeep.pipeline' has no attribute '{name}'")
