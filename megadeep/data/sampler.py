"""Which samples each data-parallel rank reads, as a pure function of the consumed-samples count.

The global sample stream is a seeded permutation of the dataset per epoch. A step consumes the next
``global_batch`` positions of it; micro-step ``j`` of DP rank ``r`` reads positions
``consumed + j·(micro·DP) + r·micro + [0, micro)``. TP and PP ranks of one replica share a DP rank and
so read the same samples; resuming from a consumed count continues the stream exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DistributedSampler:
    num_samples: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    seed: int
    shuffle: bool = True

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)

    def indices(self, consumed: int) -> np.ndarray:
        """Sample indices of this rank's micro-batch that starts at global position ``consumed``."""
        start = consumed + self.dp_rank * self.micro_batch
        positions = np.arange(start, start + self.micro_batch)
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._epoch_order(int(e))[offsets[sel]]
        return out
