"""Tensor- and sequence-parallel communication as small autograd functions.

Each function is a pair of collectives over the TP group, one for forward and its adjoint for
backward (e.g. identity ↔ all-reduce). Layers are thin users of these; nothing else in the model
talks to torch.distributed. Activations are ``[batch, seq, hidden]``: the TP split is on the last
dimension, the sequence-parallel split on dimension 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megadeep.parallel import groups

SEQ_DIM = 1


def _tp():
    world = groups.get_tensor_model_parallel_world_size()
    return (groups.get_tensor_model_parallel_group() if world > 1 else None), world


def _payload(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_reduce_(x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the TP group (x must be contiguous)."""
    group, world = _tp()
    if world > 1:
        groups.count_tp_bytes("all_reduce", _payload(x))
        dist.all_reduce(x, op=op, group=group)
    return x


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if groups.get_tensor_model_parallel_world_size() == 1:
        return x
    return all_reduce_(x.clone(memory_format=torch.contiguous_format))


def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    group, world = _tp()
    if world == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((world * front.shape[0], *front.shape[1:]))
    groups.count_tp_bytes("all_gather", _payload(out))
    dist.all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    group, world = _tp()
    if world == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    if front.shape[0] % world:
        raise ValueError(f"cannot reduce-scatter size {front.shape[0]} over {world} ranks")
    out = front.new_empty((front.shape[0] // world, *front.shape[1:]))
    groups.count_tp_bytes("reduce_scatter", _payload(front))
    dist.reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


def split(x: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (no communication)."""
    world = groups.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split size {x.shape[dim]} over {world} tensor-parallel ranks")
    return x.chunk(world, dim)[groups.get_tensor_model_parallel_rank()].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return split(x, -1)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, -1)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_gather(x, -1)

    @staticmethod
    def backward(ctx, g):
        return split(g, -1)


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return split(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, SEQ_DIM)


class _GatherFromSP(torch.autograd.Function):
    """All-gather the sequence. Its consumer is a TP region whose input grads are partial sums, so the
    backward is a reduce-scatter (unless ``grad_is_partial`` is False, then a plain split)."""

    @staticmethod
    def forward(ctx, x, grad_is_partial):
        ctx.grad_is_partial = grad_is_partial
        return all_gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return (reduce_scatter(g, SEQ_DIM) if ctx.grad_is_partial else split(g, SEQ_DIM)), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, SEQ_DIM)


def copy_to_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input to column-parallel compute)."""
    return _CopyToTP.apply(x)


def reduce_from_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-reduce forward (sum of row-parallel partials); identity backward."""
    return _ReduceFromTP.apply(x)


def scatter_to_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's slice of the last dim; all-gather the gradient."""
    return _ScatterToTP.apply(x)


def gather_from_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather the last dim; backward keeps this rank's slice of the gradient."""
    return _GatherFromTP.apply(x)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToSP.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor, grad_is_partial: bool = True) -> torch.Tensor:
    return _GatherFromSP.apply(x, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceScatterToSP.apply(x)
