"""Exact and near-duplicate detection over the whole corpus, on disk, in datatrove stages.

Exact: a 128-bit hash of the text after Unicode case folding and whitespace collapsing. Near: MinHash
signatures of a document's word n-gram set, banded for LSH by datatrove (``MinhashDedupSignature``
writes them, ``MinhashDedupBuckets`` turns equal bands into candidate pairs across every task's
documents). megadeep then does what datatrove does not:

- every candidate pair is confirmed by the *exact* Jaccard similarity of the two shingle sets (kept
  on disk by the signature stage), so the banding can be tuned for recall (≥ 99.5% at the threshold)
  without losing precision; datatrove compares only band equality, whose noise around the threshold
  misses pairs (its 14×8 default finds 92% of pairs at J = 0.8);
- exact-duplicate groups and confirmed pairs are clustered with the *first* document (input order)
  as the one kept, and each removed document records why (exact or near), for the manifest.
  (datatrove's ``MinhashDedupCluster`` keeps the root of a union-by-size, not the first document.)
"""
from __future__ import annotations

import hashlib
import string
import zlib
from dataclasses import dataclass

import numpy as np

# ASCII punctuation becomes a word boundary: "night," and "night" are the same word
_PUNCT_TO_SPACE = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd constant for the polynomial n-gram hash
MAX_PERM = 1024  # more permutations only add cost: the estimate is not used for decisions (exact Jaccard is)


@dataclass
class DedupSettings:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # exact Jaccard similarity of word n-gram sets at which a later doc is dropped
    ngram: int = 5
    num_perm: int = 128  # MinHash permutations; LSH uses bands × rows ≤ num_perm of them
    seed: int = 1


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.995) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest false candidates) that still make a pair at the
    threshold a candidate with probability ≥ ``recall``: 1 - (1 - t^r)^b."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            best = (bands, rows)
    return best


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(b" ".join(text.casefold().encode().split()), digest_size=16).digest()


def shingles(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the word n-grams (all words as one shingle if there are fewer)."""
    words = text.lower().encode().translate(_PUNCT_TO_SPACE).split()
    if not words:
        return np.zeros(0, np.uint32)
    ids = np.fromiter(map(zlib.crc32, words), np.uint64, len(words))  # ~3× faster than a per-doc dict
    n = min(n, len(ids))
    h = np.zeros(len(ids) - n + 1, np.uint64)
    for k in range(n):  # h = Σ ids[i+k]·MIX^(k+1) mod 2^64, an order-sensitive hash of each n-gram
        h = (h + ids[k: len(ids) - n + 1 + k]) * _MIX
    return (h >> np.uint64(32)).astype(np.uint32)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Odd multipliers a and offsets b of the multiply-shift hashes h(x) = (a·x + b mod 2^64) >> 32."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return a, rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)


def minhash(sh: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (uint32 per permutation) of a non-empty shingle set. Multiply-shift instead of
    datasketch's / datatrove's ``% (2^61 - 1)``: no 64-bit division, ~3× faster, equally universal.
    The shift is monotone, so it is applied once to the minimum rather than to every product (with the
    add in place, ~1.6× faster than shifting each, same signature)."""
    out = np.full(len(a), np.iinfo(np.uint64).max, np.uint64)
    x = sh.astype(np.uint64)[:, None]
    for start in range(0, len(x), 1 << 13):  # bounds the (shingles × num_perm) temporary
        h = x[start: start + (1 << 13)] * a
        h += b
        np.minimum(out, h.min(axis=0), out=out)
    return (out >> np.uint64(32)).astype(np.uint32)


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """Jaccard similarity of two sorted, de-duplicated shingle arrays."""
    if not len(x) or not len(y):
        return 0.0
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """The distinct rows of ``pairs`` (task1, doc1, task2, doc2; uint32), sorted: ``np.unique(axis=0)``,
    whose row-as-bytes sort takes ~4× longer (it is in the serial cluster stage)."""
    if not len(pairs):
        return pairs
    wide = pairs.astype(np.uint64)
    first, second = wide[:, 0] << np.uint64(32) | wide[:, 1], wide[:, 2] << np.uint64(32) | wide[:, 3]
    order = np.lexsort((second, first))
    first, second = first[order], second[order]
    new = np.ones(len(order), bool)
    new[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    return pairs[order[new]]


def same_exact_key(exact_keys: list[np.ndarray], pairs: np.ndarray) -> np.ndarray:
    """Which ``pairs`` join two documents with the same exact key (per-task key arrays, as in :func:`clusters`)."""
    if not len(pairs):
        return np.zeros(0, bool)
    starts = np.cumsum([0] + [len(k) for k in exact_keys])
    keys = np.concatenate(exact_keys)
    left = keys[starts[pairs[:, 0].astype(np.int64)] + pairs[:, 1]]
    right = keys[starts[pairs[:, 2].astype(np.int64)] + pairs[:, 3]]
    return np.all(left == right, axis=1)


EXACT, NEAR = 1, 2  # removal reasons, as stored in the remove lists
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}


def clusters(exact_keys: list[np.ndarray], pairs: np.ndarray) -> dict[tuple[int, int], int]:
    """Documents to remove, ``(task, doc) -> reason``: every document but the first (in input order)
    of each exact-duplicate group and of each connected group of confirmed near-duplicate ``pairs``
    (rows of task1, doc1, task2, doc2). A document that repeats an earlier one exactly is an exact
    duplicate, whatever else it resembles."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(x):
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    def union(x, y):
        rx, ry = root(x), root(y)
        if rx != ry:
            lo, hi = min(rx, ry), max(rx, ry)  # the first document stays the root: it is the one kept
            parent[hi] = lo

    exact_dups = set()
    if any(len(k) for k in exact_keys):
        keys = np.concatenate([k for k in exact_keys if len(k)])
        task = np.concatenate([np.full(len(k), t, np.int64) for t, k in enumerate(exact_keys) if len(k)])
        doc = np.concatenate([np.arange(len(k)) for k in exact_keys if len(k)])
        order = np.lexsort((doc, task, keys[:, 1], keys[:, 0]))  # by key, then input order
        keys, task, doc = keys[order], task[order], doc[order]
        same = np.all(keys[1:] == keys[:-1], axis=1)
        first = 0
        for i in range(1, len(keys)):
            if not same[i - 1]:
                first = i
                continue
            node = (int(task[i]), int(doc[i]))
            exact_dups.add(node)
            union((int(task[first]), int(doc[first])), node)
    for t1, d1, t2, d2 in pairs.tolist():
        union((t1, d1), (t2, d2))
    return {x: EXACT if x in exact_dups else NEAR for x in list(parent) if root(x) != x}
