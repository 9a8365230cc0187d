"""Megatron-style tensor parallelism: process groups, communication, layers, loss, RNG.

The names below load on first use (PEP 562), so that ``megadeep.parallel.layout`` — plain arithmetic the
launcher uses before any rank starts — does not import torch.
"""
from megadeep.lazy import lazy_exports

_EXPORTS = {
    "copy_to_tensor_parallel_region": "comm",
    "gather_from_sequence_parallel_region": "comm",
    "gather_from_tensor_parallel_region": "comm",
    "reduce_from_tensor_parallel_region": "comm",
    "reduce_scatter_to_sequence_parallel_region": "comm",
    "scatter_to_sequence_parallel_region": "comm",
    "scatter_to_tensor_parallel_region": "comm",
    "vocab_parallel_cross_entropy": "cross_entropy",
    "ColumnParallelLinear": "layers",
    "RowParallelLinear": "layers",
    "VocabParallelEmbedding": "layers",
    "Layout": "layout",
    "checkpoint": "random",
    "get_rng_tracker": "random",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
