"""Where each rank sits in the DP×TP×PP grid, as plain arithmetic (no torch.distributed).

Rank order is Megatron's and DeepSpeed's ``PipeModelDataParallelTopology``: TP varies fastest, then DP,
then PP — ``rank = tp + dp·TP + pp·TP·DP`` — so a TP group is adjacent ranks, i.e. one node's GPUs.
The launcher, the planner and the process groups all read positions from here.
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
