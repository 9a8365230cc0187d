"""Data: sources, splits, and the per-DP-rank stream of micro-batches the trainer consumes."""
from __future__ import annotations

from dataclasses import dataclass


from megadeep.config.schema import RunConfig
from megadeep.data.bytes import ByteWindows, read_texts
from megadeep.data.corpora import corpus_files
from megadeep.data.sampler import DistributedSampler
from megadeep.errors import ConfigError


@dataclass
class Split:
    train: ByteWindows
    val: ByteWindows | None


def build_split(cfg: RunConfig) -> Split:
    d = cfg.data
    if d.source != "bytes":
        raise ConfigError(f"data.source '{d.source}' is not supported; use bytes")
    paths = d.paths or (corpus_files(d.corpus) if d.corpus else [])
    if not paths:
        raise ConfigError("no training data: set data.paths or data.corpus (e.g. data.corpus=shakespeare)")
    data = read_texts(paths)
    n_val = int(len(data) * d.val_fraction)
    seq = cfg.train.seq_len
    val = ByteWindows(data[len(data) - n_val:], seq) if n_val > seq + 1 else None
    return Split(ByteWindows(data[: len(data) - n_val], seq), val)


class Loader:
    """Micro-batches for this DP rank, resumable from a consumed-samples count."""

    def __init__(self, dataset: ByteWindows, micro_batch: int, dp_rank: int, dp_size: int, seed: int,
                 consumed: int = 0, shuffle: bool = True):
        self.dataset = dataset
        self.sampler = DistributedSampler(len(dataset), micro_batch, dp_rank, dp_size, seed, shuffle)
        self.consumed = consumed
        self.step_samples = micro_batch * dp_size

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.dataset.batch(self.sampler.indices(self.consumed))
        self.consumed += self.step_samples
        return batch
