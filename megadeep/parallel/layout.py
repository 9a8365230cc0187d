"""Where each rank sits in the DP×TP×PP grid, as plain arithmetic (no torch.distributed).

Rank order is Megatron's and DeepSpeed's ``PipeModelDataParallelTopology``: TP varies fastest, then DP,
then PP — ``rank = tp + dp·TP + pp·TP·DP`` — so a TP group is adjacent ranks, i.e. one node's GPUs.
The launcher, the planner and the process groups all read positions from here.

Expert parallelism subdivides DP (DeepSpeed's expert groups): ``ep`` consecutive DP indices form an
expert-parallel group that shares one copy of the experts, each rank holding ``1/ep`` of them, and the
DP ranks with the same ``dp % ep`` (holding the same experts) form the expert-data-parallel group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Coord(NamedTuple):
    tp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1  # divides dp

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    def rank(self, tp: int, dp: int, pp: int) -> int:
        return tp + dp * self.tp + pp * self.tp * self.dp

    def coord(self, rank: int) -> Coord:
        return Coord(rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp))

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def model_groups(self) -> list[list[int]]:
        """TP×PP ranks holding one full model replica."""
        return [
            [self.rank(t, d, p) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)
        ]

    def ep_rank(self, rank: int) -> int:
        return self.coord(rank).dp % self.ep

    def ep_groups(self) -> list[list[int]]:
        """Ranks exchanging tokens by all-to-all: ``ep`` consecutive DP indices, same TP and PP."""
        return [[self.rank(t, d0 + e, p) for e in range(self.ep)]
                for p in range(self.pp) for d0 in range(0, self.dp, self.ep) for t in range(self.tp)]

    def expert_dp_groups(self) -> list[list[int]]:
        """Ranks holding the same experts (same ``dp % ep``, TP and PP): their expert grads are averaged."""
        return [[self.rank(t, d, p) for d in range(e, self.dp, self.ep)]
                for p in range(self.pp) for e in range(self.ep) for t in range(self.tp)]
