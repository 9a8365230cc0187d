"""Context parallelism: every rank of a CP group holds 1/cp of each sequence through the whole model.

The split is zig-zag (Megatron-Core's and torchtitan's load balancing for causal attention): the
sequence is cut into 2·cp chunks and CP rank r holds chunks r and 2·cp-1-r, so under the causal mask
every rank has the same number of (query, key) pairs to compute. Tokens and targets arrive whole on
every CP rank (the data loader gives CP ranks the same samples; they are integers, a few KB) and are
cut here; from the embedding to the loss a rank sees only its ``seq/cp`` positions.

Only attention crosses positions. Two exact ways (``parallel.cp_attention``):

- ``ulysses``: DeepSpeed-Ulysses — an all-to-all turns [seq/cp, heads] into [seq, heads/cp]
  (DeepSpeed's ``DistributedAttention``), attention runs over the whole sequence for a slice of the
  heads, and a second all-to-all turns it back. Needs the KV heads of a TP rank to divide by cp.
- ``allgather``: keys and values are all-gathered over CP (reduce-scattered in backward), each rank's
  queries attend to them under a mask built from global positions (Llama 3's CP attention). Works for any
  head count; it is what ``auto`` picks when Ulysses cannot split the KV heads.

DeepSpeed reduces gradients over DP×CP summing over CP (its Ulysses convention), so each rank's loss
is its tokens' share of the global mean: ``sum(local loss) / global token count``.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megadeep.parallel import groups
from megadeep.parallel.cp_choice import METHODS, pick  # noqa: F401  (part of this module's API)


def world() -> int:
    return groups.get_context_parallel_world_size()


@functools.lru_cache(maxsize=64)
def _zigzag(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


def local_positions(seq_len: int, device) -> torch.Tensor:
    """Global positions of this rank's tokens of a ``seq_len`` sequence (all of them at CP=1)."""
    cp = world()
    if cp == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2·cp = {2 * cp} (zig-zag split)")
    return _zigzag(seq_len, cp, groups.get_context_parallel_rank()).to(device)


def gathered_positions(seq_len: int, device) -> torch.Tensor:
    """Global position of each row of a sequence gathered over CP in rank order."""
    cp = world()
    return torch.cat([_zigzag(seq_len, cp, r) for r in range(cp)]).to(device)


def split(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's positions of a whole-sequence tensor (tokens, targets); no communication."""
    if world() == 1:
        return x
    return x.index_select(dim, local_positions(x.shape[dim], x.device))


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence over CP; backward reduce-scatters (sums) the gradients back."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        cp, group = world(), groups.get_context_parallel_group()
        front = x.movedim(dim, 0).contiguous()
        out = front.new_empty((cp * front.shape[0], *front.shape[1:]))
        dist.all_gather_single(out, front, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        cp, group = world(), groups.get_context_parallel_group()
        front = grad.movedim(ctx.dim, 0).contiguous()
        out = front.new_empty((front.shape[0] // cp, *front.shape[1:]))
        dist.reduce_scatter_single(out, front, group=group)
        return out.movedim(0, ctx.dim), None


def gather(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return _GatherSeq.apply(x, dim)


def loss_share(per_token: torch.Tensor, counted: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """This rank's part of the global mean loss over the CP group's tokens.

    Gradient: ``grad_scale · sum(local) / global count`` (scale 1 where the engine sums gradients over
    CP, as DeepSpeed's does for its sequence-parallel group; cp where it averages them, as the pipeline
    engine does over its data axis). Value: the global mean itself, identical on every CP rank, so logs
    and the engines' DP averaging of the loss see the real loss."""
    group = groups.get_context_parallel_group()
    sums = torch.stack([per_token.sum().detach().double(), counted.sum().double()])
    dist.all_reduce(sums, group=group)
    total, count = sums[0], sums[1].clamp(min=1)
    share = per_token.sum() * (grad_scale / count.to(per_token.dtype))
    return share + (total / count).to(share.dtype) - share.detach()
