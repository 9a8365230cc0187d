"""Tensor-parallel layers: thin modules over :mod:`megadeep.parallel.comm`.

Each layer holds only its local shard (``.weight`` is ``[out/TP, in]`` for a column-parallel linear,
``[out, in/TP]`` for a row-parallel one). Initial values are a function of each element's index in
the *full* (TP=1) tensor (:mod:`megadeep.parallel.counter_rng`), so a shard equals the matching slice
of the TP=1 weight while a rank computes only its own elements: under ZeRO-3 only its partition.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megadeep.parallel import comm, counter_rng, groups
from megadeep.parallel.sharding import Blocks, local_blocks, mark, shard

# (key, global flat indices in the full tensor, full row length) -> fp32 values of those elements
Fill = Callable[[int, torch.Tensor, int], torch.Tensor]
CHUNK = 1 << 20  # elements generated at a time: bounds the int64/float64 temporaries (~10 × 8 MB)


def normal_fill(std: float) -> Fill:
    def fill(key: int, flat: torch.Tensor, row_len: int) -> torch.Tensor:
        return std * counter_rng.normal(key, flat)

    return fill


def zeros_fill(key: int, flat: torch.Tensor, row_len: int) -> torch.Tensor:
    return torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)


def ones_fill(key: int, flat: torch.Tensor, row_len: int) -> torch.Tensor:
    return torch.ones(flat.shape, dtype=torch.float32, device=flat.device)


def blocks_fill(fills: list[tuple[int, Fill]]) -> Fill:
    """Consecutive row blocks of the full tensor, each with its own initialiser."""

    def fill(key: int, flat: torch.Tensor, row_len: int) -> torch.Tensor:
        row, out, start = flat // row_len, torch.empty(flat.shape, dtype=torch.float32, device=flat.device), 0
        for rows, f in fills:
            inside = (row >= start) & (row < start + rows)
            out[inside] = f(key, flat[inside], row_len)
            start += rows
        return out

    return fill


def vocab_fill(num_real: int, std: float) -> Fill:
    """Normal rows for the real vocabulary, zeros for TP padding. Values depend on the element's index
    only, so they do not depend on how much padding the TP size adds."""

    def fill(key: int, flat: torch.Tensor, row_len: int) -> torch.Tensor:
        return torch.where(flat < num_real * row_len, std * counter_rng.normal(key, flat), 0.0)

    return fill


def full_shape(param: torch.Tensor) -> list[int]:
    shape = list(getattr(param, "ds_shape", param.shape))
    if param.partition_dim is not None:
        shape[param.partition_dim] *= groups.get_tensor_model_parallel_world_size()
    return shape


def fill_positions_(out: torch.Tensor, param: torch.Tensor, fill: Fill, key: int, start: int = 0) -> None:
    """``out[i]`` ← the value of element ``start + i`` (row-major) of this rank's TP shard of ``param``."""
    local, full = list(getattr(param, "ds_shape", param.shape)), full_shape(param)
    tp_rank, tp = groups.get_tensor_model_parallel_rank(), groups.get_tensor_model_parallel_world_size()
    index = [torch.arange(n, device=out.device) for n in full]  # full-tensor index of each local position
    if param.partition_dim is not None:
        d = param.partition_dim
        index[d] = shard(index[d], 0, tp_rank, tp, param.partition_blocks)
    row_len = math.prod(full[1:])
    for c in range(0, out.numel(), CHUNK):
        rest = torch.arange(start + c, start + min(c + CHUNK, out.numel()), device=out.device)
        flat, stride = torch.zeros_like(rest), 1
        for d in reversed(range(len(local))):
            flat += index[d][rest % local[d]] * stride
            rest, stride = rest // local[d], stride * full[d]
        out[c:c + flat.numel()] = fill(key, flat, row_len).to(out.dtype)


@torch.no_grad()
def init_sharded_(param: nn.Parameter, fill: Fill, key: int | None = None) -> None:
    """Fill this rank's shard of ``param`` in place: its TP shard, or under ZeRO-3 (a parameter built
    inside ``deepspeed.zero.Init``) only its data-parallel partition ``ds_tensor``."""
    key = int(torch.randint(0, 1 << 62, ())) if key is None else key
    if hasattr(param, "ds_tensor"):
        part = param.ds_tensor.view(-1)
        start = part.numel() * dist.get_rank(group=param.ds_process_group)
        fill_positions_(part[:max(0, min(part.numel(), param.ds_numel - start))], param, fill, key, start)
        if param.numel() != param.ds_numel:  # partitioned: no full copy on this rank
            return
    fill_positions_(param.data.view(-1), param, fill, key)


_deferred = False


@contextlib.contextmanager
def deferred_init():
    """Layers built inside skip their own initialisation: the caller initialises each parameter once,
    under its canonical name (``megadeep.model.build``)."""
    global _deferred
    _deferred, before = True, _deferred
    try:
        yield
    finally:
        _deferred = before


def init_on_construction(param: torch.Tensor) -> bool:
    return not _deferred and param.device.type != "meta"


def _divide(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {world}")
    return n // world


class _ParallelLinear(nn.Module):
    weight: nn.Parameter
    bias: nn.Parameter | None
    init: Fill

    def reset_parameters(self, key: int | None = None) -> None:
        init_sharded_(self.weight, self.init, key)
        if self.bias is not None:
            init_sharded_(self.bias, zeros_fill, 0)


class ColumnParallelLinear(_ParallelLinear):
    """``Y = X Aᵀ`` with A split by output rows: each rank computes its slice of the outputs.

    ``blocks`` (sizes summing to ``out_features``) stacks several outputs in one matmul, each split
    across ranks separately (see ``sharding``); ``local_blocks`` are their sizes on this rank.
    With ``sequence_parallel`` the input arrives split on the sequence and is all-gathered first.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, gather_output: bool = False,
                 blocks: Blocks = None, sequence_parallel: bool = False, init: Fill = normal_fill(0.02),
                 device=None, dtype=None):
        super().__init__()
        world = groups.get_tensor_model_parallel_world_size()
        if blocks and sum(blocks) != out_features:
            raise ValueError(f"blocks {blocks} do not sum to out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel, self.init = gather_output, sequence_parallel, init
        self.local_blocks = local_blocks(blocks, world) or (_divide(out_features, world, "out_features"),)
        local_out = sum(self.local_blocks)
        kw = dict(device=device, dtype=dtype)
        self.weight = mark(nn.Parameter(torch.empty(local_out, in_features, **kw)), 0, blocks)
        self.bias = mark(nn.Parameter(torch.empty(local_out, **kw)), 0, blocks) if bias else None
        if init_on_construction(self.weight):
            self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = comm.gather_from_sequence_parallel_region(x)
        else:
            x = comm.copy_to_tensor_parallel_region(x)
        y = F.linear(x, self.weight, self.bias)
        return comm.gather_from_tensor_parallel_region(y) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """``Y = X Aᵀ`` with A split by input columns: partial products are summed across ranks.

    With ``sequence_parallel`` the sum is a reduce-scatter that leaves the output split on the sequence.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, init: Fill = normal_fill(0.02), device=None, dtype=None):
        super().__init__()
        world = groups.get_tensor_model_parallel_world_size()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel, self.init = input_is_parallel, sequence_parallel, init
        kw = dict(device=device, dtype=dtype)
        self.weight = mark(nn.Parameter(torch.empty(out_features, _divide(in_features, world, "in_features"), **kw)), 1)
        self.bias = mark(nn.Parameter(torch.empty(out_features, **kw)), None) if bias else None
        if init_on_construction(self.weight):
            self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = comm.scatter_to_tensor_parallel_region(x)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = comm.reduce_from_tensor_parallel_region(y)
        if self.bias is None:
            return y
        bias = comm.copy_to_tensor_parallel_region(self.bias) if self.sequence_parallel else self.bias
        return y + bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary, padded to ``padded_vocab``) are split across TP ranks.

    Padding rows start at zero and, because the loss masks padded logits, never receive gradient.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padded_vocab: int | None = None,
                 sequence_parallel: bool = False, std: float = 0.02, device=None, dtype=None):
        super().__init__()
        world = groups.get_tensor_model_parallel_world_size()
        self.num_embeddings = num_embeddings
        self.padded_vocab = padded_vocab or num_embeddings
        if self.padded_vocab < num_embeddings:
            raise ValueError(f"padded_vocab={self.padded_vocab} < num_embeddings={num_embeddings}")
        self.per_rank = _divide(self.padded_vocab, world, "padded vocab")
        self.start = groups.get_tensor_model_parallel_rank() * self.per_rank
        self.sequence_parallel = sequence_parallel
        self.init = vocab_fill(num_embeddings, std)
        self.weight = mark(nn.Parameter(torch.empty(self.per_rank, embedding_dim, device=device, dtype=dtype)), 0)
        if init_on_construction(self.weight):
            self.reset_parameters()

    def reset_parameters(self, key: int | None = None) -> None:
        init_sharded_(self.weight, self.init, key)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.per_rank == self.padded_vocab:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.start) | (ids >= self.start + self.per_rank)
            local = (ids - self.start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence_parallel_region(out)
        return comm.reduce_from_tensor_parallel_region(out)
