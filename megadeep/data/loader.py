"""What the trainer reads: the train/validation split of the configured source, and the per-DP-rank
stream of micro-batches."""
from __future__ import annotations

from dataclasses import dataclass

from megadeep.config.schema import RunConfig
from megadeep.data.bytes import ByteWindows, read_texts
from megadeep.data.corpora import corpus_files
from megadeep.data.dataset import Blend, PackedTokens, token_split
from megadeep.data.sampler import DistributedSampler
from megadeep.errors import ConfigError

Samples = ByteWindows | PackedTokens | Blend  # what a Loader reads: len() and batch(indices)


@dataclass
class Split:
    train: Samples
    val: Samples | None


def build_split(cfg: RunConfig) -> Split:
    d = cfg.data
    if d.format == "chat":
        from megadeep.finetune.chat import chat_split

        return chat_split(cfg)
    if d.source == "tokens":
        s = token_split(d, cfg.train.seq_len, cfg.train.seed)
        if cfg.model.vocab_size < s.vocab_size:  # larger: spare embedding rows, allowed by prepare_data
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has {s.vocab_size} "
                              "pieces; resolve the config with megadeep.data.prepare.prepare_data first")
        return Split(s.train, s.val)
    data = read_texts(d.paths or corpus_files(d.corpus))  # validate.check_data ensured one of them is set
    n_val = int(len(data) * d.val_fraction)
    seq = cfg.train.seq_len
    val = ByteWindows(data[len(data) - n_val:], seq) if n_val > seq + 1 else None
    return Split(ByteWindows(data[: len(data) - n_val], seq), val)


class Loader:
    """Micro-batches for this DP rank, resumable from a consumed-samples count."""

    def __init__(self, dataset: Samples, micro_batch: int, dp_rank: int, dp_size: int, seed: int,
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
