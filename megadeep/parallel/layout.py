"""Where each rank sits in the TP×CP×DP×PP grid, as plain arithmetic (no torch.distributed).

Rank order is Megatron's and DeepSpeed's ``PipeModelDataParallelTopology`` with context parallelism
between TP and DP (as Megatron-Core places it): TP varies fastest, then CP, then DP, then PP —
``rank = tp + cp·TP + dp·TP·CP + pp·TP·CP·DP`` — so a TP group is adjacent ranks, i.e. one node's
GPUs, and a CP group is the next-closest. The launcher, the planner and the process groups all read
positions from here. ``coord`` stays (tp, dp, pp); a rank's CP index is ``cp_index``.
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
