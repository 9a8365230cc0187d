"""Megatron-style tensor parallelism: process groups, communication, layers, loss, RNG."""
from megadeep.parallel.comm import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megadeep.parallel.cross_entropy import vocab_parallel_cross_entropy
from megadeep.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megadeep.parallel.layout import Layout
from megadeep.parallel.random import checkpoint, get_rng_tracker

__all__ = [
    "ColumnParallelLinear", "Layout", "RowParallelLinear", "VocabParallelEmbedding", "checkpoint",
    "copy_to_tensor_parallel_region", "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region", "get_rng_tracker", "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region", "vocab_parallel_cross_entropy",
]
