"""Pipeline parallelism: the Llama decoder cut into stages for DeepSpeed's pipeline engine.

The names below load on first use (PEP 562), so that ``megadeep.pipeline.partition`` — plain Python
the launcher's checks use before any rank starts — does not import DeepSpeed and torch.
"""
from megadeep.lazy import lazy_exports

_EXPORTS = {"PipelinedLlama": "stages", "layer_specs": "stages", "check_grid": "topology", "topology": "topology"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
