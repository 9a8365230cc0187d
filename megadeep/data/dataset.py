"""Training samples from token shards: packing, train/validation split, and blending by weight.

A dataset (one manifest) is the concatenation of its shards: documents back to back, each followed by
eos. Sample i is the window of ``seq_len + 1`` tokens at offset ``i·seq_len`` (inputs and shifted
targets), so documents are packed without padding and samples may span documents and shards. The
last ``val_fraction`` of each dataset's tokens is its validation part and is never trained on.

Shuffling is not done here: :class:`~megadeep.data.sampler.DistributedSampler` permutes sample
indices per epoch from the seed, and a :class:`Blend` only fixes which samples make up an epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megadeep.config.schema import DataConfig
from megadeep.data.shards import check_manifests
from megadeep.errors import DataError


def to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows.astype(np.int64))
    return t[:, :-1], t[:, 1:]


class PackedTokens:
    """Windows of ``seq_len + 1`` tokens over the token range ``[start, end)`` of a list of shards."""

    def __init__(self, shards: list[np.ndarray], start: int, end: int, seq_len: int, name: str = ""):
        self.shards, self.start, self.seq_len = shards, start, seq_len
        self.bounds = np.cumsum([0] + [len(s) for s in shards])
        self.num_samples = max(0, (end - start - 1) // seq_len)
        self.name = name

    def __len__(self) -> int:
        return self.num_samples

    def _window(self, begin: int, end: int) -> np.ndarray:
        first = int(np.searchsorted(self.bounds, begin, side="right")) - 1
        parts = []
        while begin < end:
            shard = self.shards[first]
            lo = begin - self.bounds[first]
            hi = min(end - self.bounds[first], len(shard))
            parts.append(shard[lo:hi])
            begin += hi - lo
            first += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        s, n = self.seq_len, self.num_samples
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"sample index out of range [0, {n})")
        return np.stack([self._window(self.start + i * s, self.start + i * s + s + 1) for i in indices])

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_batch(self.rows(indices))


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``shares`` that sum to exactly ``total``."""
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts


class Blend:
    """An epoch of ``size`` samples drawn from several datasets in proportion to their weights.

    Dataset d contributes exactly ``round(w_d · size)`` samples per epoch, spread evenly through the
    epoch's index order. It is read in a fixed seeded order and wraps around when its weight asks for
    more samples than it has (upsampling), or is read only in part (downsampling).
    """

    def __init__(self, datasets: list[PackedTokens], weights: list[float], seed: int, size: int | None = None):
        self.datasets = datasets
        n = size if size is not None else sum(len(d) for d in datasets)
        self.counts = _largest_remainder(np.asarray(weights, dtype=np.float64), n)
        which, take, spread = [], [], []
        for d, (ds, c) in enumerate(zip(datasets, self.counts)):
            if c and not len(ds):
                raise DataError(f"dataset {ds.name} has fewer tokens than one sample; drop it from data.paths")
            order = np.random.default_rng((seed, d)).permutation(len(ds)) if c else np.zeros(0, np.int64)
            which.append(np.full(c, d, np.int32))
            take.append(order[np.arange(c) % max(len(ds), 1)])
            spread.append((np.arange(c) + 0.5) / max(c, 1))
        pos = np.argsort(np.concatenate(spread), kind="stable")
        self.dataset_of = np.concatenate(which)[pos]
        self.sample_of = np.concatenate(take)[pos]

    def __len__(self) -> int:
        return len(self.dataset_of)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        which, samples = self.dataset_of[indices], self.sample_of[indices]
        out = np.empty((len(indices), self.datasets[0].seq_len + 1), dtype=np.int64)
        for d in np.unique(which):
            sel = which == d
            out[sel] = self.datasets[d].rows(samples[sel])
        return out

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_batch(self.rows(indices))


@dataclass
class TokenSplit:
    train: PackedTokens | Blend
    val: PackedTokens | Blend | None
    vocab_size: int


def token_split(d: DataConfig, seq_len: int, seed: int) -> TokenSplit:
    manifests = check_manifests(d)
    trains, vals = [], []
    for m in manifests:
        m.verify(checksums=d.verify_checksums)
        shards = m.shard_tokens()
        total = sum(len(s) for s in shards)
        n_val = int(total * d.val_fraction)
        trains.append(PackedTokens(shards, 0, total - n_val, seq_len, str(m.path)))
        vals.append(PackedTokens(shards, total - n_val, total, seq_len, str(m.path)))
    weights = d.weights or [len(t) for t in trains]  # default: each sample once per epoch
    if not any(len(t) for t in trains):
        raise DataError(f"{manifests[0].path} holds fewer tokens than one sample of train.seq_len={seq_len}")
    train = trains[0] if len(trains) == 1 else Blend(trains, weights, seed)
    held_out = [(v, w) for v, w in zip(vals, weights) if len(v)]
    val = None
    if len(held_out) == 1:
        val = held_out[0][0]
    elif held_out:
        val = Blend([v for v, _ in held_out], [w for _, w in held_out], seed)
    return TokenSplit(train, val, manifests[0].tokenizer["vocab_size"])
