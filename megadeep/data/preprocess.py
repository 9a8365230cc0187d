"""Raw text → token shards: decode, normalise, quality rules, exact and near dedup, PII scrubbing,
tokenisation, with a drop counter per reason (documents in = kept + dropped, always).

Per-document work (everything but the dedup decisions) runs in worker processes on batches of raw
records. The main process reads the input, keeps the dedup indexes, and writes shards, consuming the
batches in input order so that the output does not depend on the number of workers.
"""
from __future__ import annotations

import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from megadeep.data.cleaning import NORMALIZATIONS, QualityRules, normalize, quality_failure
from megadeep.data.dedup import DedupSettings, NearDuplicateIndex, exact_key, signature
from megadeep.data.pii import scrub
from megadeep.data.reader import FORMATS, Record, decode_record, expand_inputs, read_records
from megadeep.data.shards import ShardWriter, write_manifest
from megadeep.data.tokenizer import INFO_FILE, MODEL_FILE, Tokenizer
from megadeep.errors import DataError

STAGES = ("decode", "normalize", "quality", "dedup_signature", "pii", "tokenize")


@dataclass
class PreprocessSettings:
    json_field: str = "text"  # JSON-lines field that holds the document
    format: str = "auto"  # auto (by file suffix) | text (a file is a document) | jsonl
    normalization: str = "NFC"  # NFC | NFKC | none
    max_doc_bytes: int = 16 << 20  # a larger document (or JSON line) is dropped unread
    quality: QualityRules = field(default_factory=QualityRules)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    pii: bool = True
    shard_tokens: int = 1 << 26  # tokens per shard file
    workers: int = 0  # worker processes; 0: one per CPU core
    batch_bytes: int = 1 << 20  # raw bytes per task sent to a worker

    def check(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"format must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if self.normalization not in NORMALIZATIONS:
            raise DataError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got '{self.normalization}'")
        if not 0.0 < self.dedup.threshold <= 1.0:
            raise DataError(f"dedup.threshold is a Jaccard similarity in (0, 1], got {self.dedup.threshold}")
        if self.dedup.ngram < 1 or self.dedup.num_perm < 16:
            raise DataError("dedup.ngram must be ≥ 1 and dedup.num_perm ≥ 16")
        if self.shard_tokens < 1 or self.max_doc_bytes < 1 or self.workers < 0:
            raise DataError("shard_tokens and max_doc_bytes must be ≥ 1 and workers ≥ 0")


@dataclass
class Doc:
    """What a worker returns for one record: a drop reason, or everything the main process needs."""
    nbytes: int
    reason: str | None = None
    tokens: np.ndarray | None = None
    key: bytes | None = None
    sig: np.ndarray | None = None
    pii: Counter | None = None


@lru_cache(maxsize=2)
def _tokenizer(path: str) -> Tokenizer:
    return Tokenizer(path)  # loaded once per worker process


def clean_text(kind: str, raw: bytes, s: PreprocessSettings, clock: Counter) -> tuple[str | None, str | None]:
    """Decode, normalise and apply the quality rules: (text, None) or (None, drop reason)."""
    t0 = time.process_time()
    text, reason = decode_record(kind, raw, s.json_field)
    t1 = time.process_time()
    clock["decode"] += t1 - t0
    if text is None:
        return None, reason
    text = normalize(text, s.normalization)
    t2 = time.process_time()
    clock["normalize"] += t2 - t1
    reason = quality_failure(text, s.quality)
    clock["quality"] += time.process_time() - t2
    return (None, reason) if reason else (text, None)


def process_batch(task: tuple[PreprocessSettings, str, list[Record]]) -> tuple[list[Doc], Counter]:
    """Worker: every per-document step for a batch of records, and the seconds spent per stage."""
    s, tokenizer_path, records = task
    tok = _tokenizer(tokenizer_path)
    clock: Counter = Counter()
    out = []
    for kind, raw, reason, nbytes in records:
        if reason is None:
            text, reason = clean_text(kind, raw, s, clock)
        if reason is not None:
            out.append(Doc(nbytes, reason))
            continue
        t0 = time.process_time()
        key = exact_key(text) if s.dedup.exact else None
        sig = signature(text, s.dedup) if s.dedup.near else None
        t1 = time.process_time()
        text, pii = scrub(text) if s.pii else (text, Counter())
        t2 = time.process_time()
        tokens = tok.encode(text)
        t3 = time.process_time()
        clock["dedup_signature"] += t1 - t0
        clock["pii"] += t2 - t1
        clock["tokenize"] += t3 - t2
        out.append(Doc(nbytes, None, tokens, key, sig, pii))
    return out, clock


def _batches(records: Iterable[Record], batch_bytes: int) -> Iterator[list[Record]]:
    batch, size = [], 0
    for r in records:
        batch.append(r)
        size += r[3] if r[1] is not None else 0
        if size >= batch_bytes or len(batch) >= 4096:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _run_ordered(fn, tasks: Iterator, workers: int) -> Iterator:
    """``map(fn, tasks)`` on ``workers`` processes, in order, with at most 2 tasks per worker in flight."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    import multiprocessing

    # spawn, not fork: the caller may hold threads (torch, a test runner) that fork would copy mid-lock
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class Stats:
    documents_in: int = 0
    documents_kept: int = 0
    bytes_in: int = 0
    bytes_kept: int = 0
    tokens: int = 0
    dropped: Counter = field(default_factory=Counter)
    pii_replaced: Counter = field(default_factory=Counter)
    stage_seconds: Counter = field(default_factory=Counter)  # CPU seconds per stage, summed over processes
    wall_seconds: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dropped"] = dict(sorted(self.dropped.items()))
        d["pii_replaced"] = dict(sorted(self.pii_replaced.items()))
        d["stage_seconds"] = {k: round(self.stage_seconds[k], 4) for k in (*STAGES, "dedup_index", "write")}
        d["wall_seconds"] = round(self.wall_seconds, 3)
        return d


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output directory {out} is not empty; pass --overwrite or choose another --out")
        for p in out.iterdir():
            if p.name.startswith("shard_") or p.name in ("manifest.json", MODEL_FILE, INFO_FILE):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def preprocess(inputs: list[str], out_dir: str | Path, tokenizer: str | Path, s: PreprocessSettings,
               overwrite: bool = False) -> dict:
    """Run the pipeline over ``inputs`` into ``out_dir``; returns the manifest (also written there)."""
    s.check()
    start = time.perf_counter()
    paths = expand_inputs(inputs)
    tok = Tokenizer(tokenizer)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    shutil.copyfile(tok.path, out / MODEL_FILE)
    if (tok.path.parent / INFO_FILE).is_file():
        shutil.copyfile(tok.path.parent / INFO_FILE, out / INFO_FILE)

    writer = ShardWriter(out, tok.vocab_size, tok.eos_id, s.shard_tokens)
    stats, seen, near = Stats(), set(), NearDuplicateIndex(s.dedup)
    workers = s.workers or os.cpu_count() or 1
    tasks = ((s, str(tok.path), batch) for batch in _batches(read_records(paths, s.format, s.max_doc_bytes), s.batch_bytes))
    for docs, clock in _run_ordered(process_batch, tasks, workers):
        stats.stage_seconds.update(clock)
        t0 = time.process_time()
        kept = []
        for doc in docs:
            stats.documents_in += 1
            stats.bytes_in += doc.nbytes
            reason = doc.reason
            if reason is None and doc.key is not None:
                reason = "exact_duplicate" if doc.key in seen else None
                seen.add(doc.key)
            if reason is None and doc.sig is not None and near.check_and_add(doc.sig):
                reason = "near_duplicate"
            if reason is not None:
                stats.dropped[reason] += 1
                continue
            kept.append(doc)
        t1 = time.process_time()
        for doc in kept:
            stats.documents_kept += 1
            stats.bytes_kept += doc.nbytes
            stats.tokens += len(doc.tokens) + 1
            stats.pii_replaced.update(doc.pii)
            writer.add(doc.tokens)
        stats.stage_seconds["dedup_index"] += t1 - t0
        stats.stage_seconds["write"] += time.process_time() - t1
    t0 = time.process_time()
    writer.flush()
    stats.stage_seconds["write"] += time.process_time() - t0
    stats.wall_seconds = time.perf_counter() - start
    assert stats.documents_in == stats.documents_kept + sum(stats.dropped.values())
    manifest = {
        "tokenizer": {"file": MODEL_FILE, **tok.identity()},
        "dtype": writer.dtype.name,
        "documents": stats.documents_kept,
        "tokens": stats.tokens,
        "shards": writer.shards,
        "stats": {**stats.as_dict(), "workers": workers},
        "inputs": [str(p) for p in paths],
        "settings": asdict(s),
    }
    write_manifest(out, manifest)
    return manifest


def tokenizer_sample(inputs: list[str], s: PreprocessSettings, max_bytes: int) -> Iterator[str]:
    """The first ``max_bytes`` of documents that pass cleaning, PII-scrubbed: what a tokenizer trains on."""
    s.check()
    clock: Counter = Counter()
    taken = 0
    for kind, raw, reason, _ in read_records(expand_inputs(inputs), s.format, s.max_doc_bytes):
        text, reason = clean_text(kind, raw, s, clock) if reason is None else (None, reason)
        if text is None:
            continue
        yield scrub(text)[0] if s.pii else text
        taken += len(raw)
        if taken >= max_bytes:
            return
