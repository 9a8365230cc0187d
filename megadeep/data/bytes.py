"""Byte-level text: each UTF-8 byte is a token (vocab 256). No tokenizer to train, so it is the
zero-setup data source for tests and quick runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megadeep.errors import ConfigError


class ByteWindows:
    """Non-overlapping windows of ``seq_len + 1`` bytes (inputs and shifted targets)."""

    def __init__(self, data: np.ndarray, seq_len: int):
        self.data, self.seq_len = data, seq_len
        self.num_samples = (len(data) - 1) // seq_len
        if self.num_samples < 1:
            raise ConfigError(f"the text has {len(data)} bytes, fewer than one sample of train.seq_len={seq_len}")

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.data[i * self.seq_len: i * self.seq_len + self.seq_len + 1] for i in indices])
        t = torch.from_numpy(rows.astype(np.int64))
        return t[:, :-1], t[:, 1:]


def read_texts(paths: list[str]) -> np.ndarray:
    chunks = []
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"data path '{p}' does not exist")
        chunks.append(np.frombuffer(Path(p).read_bytes(), dtype=np.uint8))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
