"""How a tensor-parallel parameter relates to its full (TP=1) tensor.

Layers tag their parameters with ``partition_dim`` and ``partition_blocks``. Blocks are consecutive
pieces of the full tensor along that dim, each split across ranks on its own: the fused QKV weight is
``[q; k; v]`` with blocks (q, k, v) and the SwiGLU weight ``[gate; up]`` with blocks (ffn, ffn), so every
shard holds its own heads' q, k and v (or matching gate and up rows) and needs no communication between
them. Initialisation, checkpoint resharding and Hugging Face export all go through these functions, so
the layout is defined in one place.
"""
from __future__ import annotations

import torch

Blocks = tuple[int, ...] | None


def mark(param: torch.nn.Parameter, dim: int | None, blocks: Blocks = None) -> torch.nn.Parameter:
    """Tag ``param`` as sharded along ``dim`` (None: replicated on every TP rank)."""
    param.tensor_model_parallel = dim is not None  # read by DeepSpeed's grad-norm dedup
    param.partition_dim = dim
    param.partition_blocks = tuple(blocks) if blocks else None
    return param


def local_blocks(blocks: Blocks, world: int) -> tuple[int, ...] | None:
    """Block sizes on one rank; every block must split evenly."""
    if not blocks:
        return None
    if any(b % world for b in blocks):
        raise ValueError(f"blocks {blocks} do not split over {world} tensor-parallel ranks")
    return tuple(b // world for b in blocks)


def shard(full: torch.Tensor, dim: int | None, rank: int, world: int, blocks: Blocks = None) -> torch.Tensor:
    """Rank ``rank``'s piece of ``full``."""
    if dim is None or world == 1:
        return full
    parts = full.split(list(blocks), dim) if blocks else (full,)
    if any(p.shape[dim] % world for p in parts):
        raise ValueError(f"dim {dim} of shape {tuple(full.shape)} (blocks {blocks}) does not split over {world} ranks")
    return torch.cat([p.chunk(world, dim)[rank] for p in parts], dim)


def unshard(pieces: list[torch.Tensor], dim: int | None, blocks: Blocks = None) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's piece, in rank order."""
    if dim is None or len(pieces) == 1:
        return pieces[0]
    sizes = local_blocks(blocks, len(pieces)) or (pieces[0].shape[dim],)
    per_rank = [p.split(list(sizes), dim) for p in pieces]
    return torch.cat([torch.cat([pr[i] for pr in per_rank], dim) for i in range(len(sizes))], dim)
