"""Exact and near-duplicate detection.

Exact: a 128-bit hash of the text after Unicode case folding and whitespace collapsing. Near: MinHash
signatures of a document's word n-gram set (datasketch), looked up in an LSH index (datasketch) that
is tuned to miss few pairs above the threshold; each candidate is then confirmed by its estimated
Jaccard similarity, so documents that merely share an LSH band are kept. The first document of a
group is kept, later ones are dropped, in input order.

Signatures are computed in the worker processes (:func:`signature`); the index lives in the main
process, which sees documents in input order.
"""
from __future__ import annotations

import hashlib
import string
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

_SCHEME = "affine32"
# ASCII punctuation becomes a word boundary: "night," and "night" are the same word
_PUNCT_TO_SPACE = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd constant for the polynomial n-gram hash


@dataclass
class DedupSettings:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard similarity of word n-gram sets at which a later doc is dropped
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(b" ".join(text.casefold().encode().split()), digest_size=16).digest()


def shingles(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the word n-grams (all words as one shingle if there are fewer)."""
    words = text.lower().encode().translate(_PUNCT_TO_SPACE).split()
    if not words:
        return np.zeros(0, np.uint32)
    table = {w: zlib.crc32(w) for w in set(words)}
    ids = np.fromiter(map(table.__getitem__, words), np.uint64, len(words))
    n = min(n, len(ids))
    h = np.zeros(len(ids) - n + 1, np.uint64)
    for k in range(n):  # h = Σ ids[i+k]·MIX^(k+1) mod 2^64, an order-sensitive hash of each n-gram
        h = (h + ids[k: len(ids) - n + 1 + k]) * _MIX
    return (h >> np.uint64(32)).astype(np.uint32)  # repeats need no removal: MinHash takes minima


@lru_cache(maxsize=4)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch draws a MinHash's permutations from its seed on every construction (~0.4 ms); draw once."""
    return MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations


def signature(text: str, s: DedupSettings) -> np.ndarray | None:
    """MinHash signature (``num_perm`` uint32) of ``text``'s word n-grams; None for a text without words."""
    hashes = shingles(text, s.ngram)
    if len(hashes) == 0:
        return None
    m = MinHash(num_perm=s.num_perm, seed=s.seed, hashfunc=int, scheme=_SCHEME,
                permutations=_permutations(s.num_perm, s.seed))
    for start in range(0, len(hashes), 1 << 15):  # bounds the (shingles × num_perm) temporary
        m.update_batch(hashes[start: start + (1 << 15)].tolist())
    return m.hashvalues.astype(np.uint32)


class NearDuplicateIndex:
    """Signatures of the documents kept so far; answers "is this one a near-duplicate of any?"."""

    def __init__(self, s: DedupSettings):
        self.s = s
        # weigh misses 9:1 over false candidates: every candidate is confirmed below anyway
        self.lsh = MinHashLSH(threshold=s.threshold, num_perm=s.num_perm, weights=(0.1, 0.9))
        self.kept: list[np.ndarray] = []

    def check_and_add(self, sig: np.ndarray) -> bool:
        """True if ``sig`` is a near-duplicate of a kept document; otherwise remember it and return False."""
        m = LeanMinHash(seed=self.s.seed, hashvalues=sig, scheme=_SCHEME)
        for key in self.lsh.query(m):
            if np.count_nonzero(self.kept[key] == sig) >= self.s.threshold * len(sig):
                return True
        self.lsh.insert(len(self.kept), m, check_duplication=False)
        self.kept.append(sig)
        return False
