"""Where each rank sits in the TP×CP×DP×PP grid, as plain arithmetic (no torch.distributed).

Rank order is Megatron's and DeepSpeed's ``PipeModelDataParallelTopology`` with context parallelism
between TP and DP (as Megatron-Core places it): TP varies fastest, then CP, then DP, then PP —
``rank = tp + cp·TP + dp·TP·CP + pp·TP·CP·DP`` — so a TP group is adjacent ranks, i.e. one node's
GPUs, and a CP group is the next-closest. The launcher, the planner and the process groups all read
positions from here. ``coord`` stays (tp, dp, pp); a rank's CP index is ``cp_index``.

Expert parallelism subdivides DP (DeepSpeed's expert groups): ``ep`` consecutive DP indices (same TP, CP and PP) form an
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
    cp: int = 1  # context parallel: ranks that split every sequence (they hold the same weights)
    ep: int = 1  # divides dp

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def rank(self, tp: int, dp: int, pp: int, cp: int = 0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def coord(self, rank: int) -> Coord:
        tcd = self.tp * self.cp * self.dp
        return Coord(rank % self.tp, (rank // (self.tp * self.cp)) % self.dp, rank // tcd)

    def cp_index(self, rank: int) -> int:
        return (rank // self.tp) % self.cp

    def _all(self):
        """Every (tp, cp, dp, pp) coordinate, in rank order."""
        return [(t, c, d, p) for p in range(self.pp) for d in range(self.dp) for c in range(self.cp)
                for t in range(self.tp)]

    def _groups(self, varying: str) -> list[list[int]]:
        """The ranks that differ only in the axes named in ``varying`` (letters of 'tcdp'), one list per
        combination of the others, each in rank order."""
        out: dict[tuple, list[int]] = {}
        for t, c, d, p in self._all():
            key = tuple(v for axis, v in zip("tcdp", (t, c, d, p)) if axis not in varying)
            out.setdefault(key, []).append(self.rank(t, d, p, c))
        return list(out.values())

    def tp_groups(self) -> list[list[int]]:
        return self._groups("t")

    def dp_groups(self) -> list[list[int]]:
        return self._groups("d")

    def pp_groups(self) -> list[list[int]]:
        return self._groups("p")

    def cp_groups(self) -> list[list[int]]:
        return self._groups("c")

    def dp_cp_groups(self) -> list[list[int]]:
        """DP×CP ranks: they hold the same weights, so gradients are reduced (and ZeRO shards) over them."""
        return self._groups("cd")

    def model_groups(self) -> list[list[int]]:
        """TP×PP ranks holding one full model replica."""
        return self._groups("tp")

    def ep_rank(self, rank: int) -> int:
        return self.coord(rank).dp % self.ep

    def ep_groups(self) -> list[list[int]]:
        """Ranks exchanging tokens by all-to-all: ``ep`` consecutive DP indices, same TP, CP and PP."""
        return [[self.rank(t, d0 + e, p, c) for e in range(self.ep)]
                for p in range(self.pp) for d0 in range(0, self.dp, self.ep) for c in range(self.cp)
                for t in range(self.tp)]

    def expert_dp_groups(self) -> list[list[int]]:
        """Ranks holding the same experts (same ``dp % ep``, TP and PP): their expert grads are averaged
        (over CP too: CP ranks hold the same weights)."""
        return [[self.rank(t, d, p, c) for d in range(e, self.dp, self.ep) for c in range(self.cp)]
                for p in range(self.pp) for e in range(self.ep) for t in range(self.tp)]
