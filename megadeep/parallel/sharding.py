"""How a tensor-parallel parameter relates to its full (TP=1) tensor.

Layers tag their parameters with ``partition_dim`` and ``partition_stride`` (Megatron's names). A
stride of k means the full tensor is k blocks along that dim, each split across ranks on its own —
the fused SwiGLU weight is ``[gate; up]`` with stride 2, so every shard holds matching gate and up
rows. Initialisation, checkpoint resharding and Hugging Face export all go through these two
functions, so the layout is defined in one place.
"""
from __future__ import annotations

import torch


def mark(param: torch.nn.Parameter, dim: int | None, stride: int = 1) -> torch.nn.Parameter:
    """Tag ``param`` as sharded along ``dim`` (None: replicated on every TP rank)."""
    param.tensor_model_parallel = dim is not None  # read by DeepSpeed's grad-norm dedup
    param.partition_dim = dim
    param.partition_stride = stride
    return param


def shard(full: torch.Tensor, dim: int | None, rank: int, world: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s piece of ``full``."""
    if dim is None or world == 1:
        return full
    blocks = full.chunk(stride, dim)
    if any(b.shape[dim] % world for b in blocks):
        raise ValueError(f"dim {dim} of shape {tuple(full.shape)} (stride {stride}) does not split over {world} ranks")
    return torch.cat([b.chunk(world, dim)[rank] for b in blocks], dim)


def unshard(pieces: list[torch.Tensor], dim: int | None, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's piece, in rank order."""
    if dim is None or len(pieces) == 1:
        return pieces[0]
    per_rank = [p.chunk(stride, dim) for p in pieces]
    return torch.cat([torch.cat([pr[s] for pr in per_rank], dim) for s in range(stride)], dim)
