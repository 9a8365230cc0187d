"""Token shards on disk and the manifest that describes them.

A shard is a pair of files: ``NAME.bin`` holds the token ids of its documents back to back, each
document followed by the tokenizer's eos id (uint16, or uint32 for vocabularies over 65,536), and
``NAME.idx.npy`` the document end offsets (int64; document i is ``bin[idx[i-1]:idx[i]]``). The .bin
is read with ``np.memmap``, so a dataset of any size opens instantly and costs no memory.

``manifest.json`` lists every shard with its document and token counts and both files' sha256, the
tokenizer's identity, what preprocessing dropped and why, and the settings used. It is written last
(atomically), so a directory with a manifest is a complete dataset.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megadeep.config.schema import DataConfig
from megadeep.data.tokenizer import open_tokenizer, sha256_file
from megadeep.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "megadeep-tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardWriter:
    """Appends tokenised documents and cuts a new shard every ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, vocab_size: int, eos_id: int, shard_tokens: int):
        self.out_dir, self.eos_id, self.shard_tokens = Path(out_dir), eos_id, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.shards: list[dict] = []
        self._docs: list[np.ndarray] = []
        self._tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self._docs.append(np.append(tokens.astype(self.dtype, copy=False), self.dtype.type(self.eos_id)))
        self._tokens += len(tokens) + 1
        if self._tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._docs:
            return
        name = f"shard_{len(self.shards):05d}"
        bin_path, idx_path = self.out_dir / f"{name}.bin", self.out_dir / f"{name}.idx.npy"
        np.concatenate(self._docs).tofile(bin_path)
        np.save(idx_path, np.cumsum([len(d) for d in self._docs], dtype=np.int64))
        self.shards.append({"name": name, "documents": len(self._docs), "tokens": self._tokens,
                            "bin_sha256": sha256_file(bin_path), "idx_sha256": sha256_file(idx_path)})
        self._docs, self._tokens = [], 0


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class Manifest:
    path: Path  # the manifest.json
    data: dict = field(repr=False)

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"])

    def verify(self, checksums: bool = True) -> None:
        """Every shard exists with the size the manifest says; with ``checksums``, also its sha256."""
        for s in self.data["shards"]:
            bin_path = self.dir / f"{s['name']}.bin"
            idx_path = self.dir / f"{s['name']}.idx.npy"
            for p in (bin_path, idx_path):
                if not p.is_file():
                    raise DataError(f"shard file {p} listed in {self.path} is missing; re-run `megadeep data preprocess`")
            if bin_path.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise DataError(f"shard {bin_path} has {bin_path.stat().st_size} bytes but {self.path} says "
                                f"{s['tokens']} tokens; the file is truncated or replaced, re-run `megadeep data preprocess`")
            if checksums:
                for p, key in ((bin_path, "bin_sha256"), (idx_path, "idx_sha256")):
                    if sha256_file(p) != s[key]:
                        raise DataError(f"shard {p} fails its sha256 check against {self.path} (corrupt or changed "
                                        "since preprocessing); re-run `megadeep data preprocess`")
            ends = np.load(idx_path, allow_pickle=False)
            if len(ends) != s["documents"] or (len(ends) and ends[-1] != s["tokens"]):
                raise DataError(f"document index {idx_path} does not match {self.path}; re-run `megadeep data preprocess`")

    def shard_tokens(self) -> list[np.ndarray]:
        """The token stream of each shard, memory-mapped."""
        return [np.memmap(self.dir / f"{s['name']}.bin", dtype=self.dtype, mode="r") for s in self.data["shards"]]


def load_manifest(path: str | Path) -> Manifest:
    """Read ``path`` (a manifest.json or the directory holding one); checks only the JSON itself."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise DataError(f"no dataset manifest at '{path}'; point data.paths at the output of `megadeep data preprocess`")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"dataset manifest {p} is not valid JSON; re-run `megadeep data preprocess`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{p} is not a {FORMAT} manifest; re-run `megadeep data preprocess` with this megadeep")
    return Manifest(p, data)


def check_manifests(d: DataConfig) -> list[Manifest]:
    """The manifests of ``data.paths``, made with one tokenizer (and with ``data.tokenizer``, if set)."""
    manifests = [load_manifest(p) for p in d.paths]
    first = manifests[0]
    for m in manifests[1:]:
        if m.tokenizer["sha256"] != first.tokenizer["sha256"]:
            raise DataError(f"{m.path} and {first.path} were made with different tokenizers; "
                            "preprocess every dataset of a blend with the same one")
    if d.tokenizer:
        if open_tokenizer(d.tokenizer).identity()["sha256"] != first.tokenizer["sha256"]:
            raise DataError(f"data.tokenizer={d.tokenizer} is not the tokenizer {first.path} was made with; "
                            "unset data.tokenizer or preprocess the data with it")
    return manifests
