"""megadeep's datatrove pipeline steps: what datatrove lacks, on datatrove's document stream.

Stage 1 (a task per input-file shard): :class:`~megadeep.data.reader.InputReader` → :class:`Clean`
(bad records, normalisation, quality rules, PII, all counted) → datatrove ``JsonlWriter`` (the clean
documents, read again by stage 4) → :class:`Signatures` (MinHash bands through datatrove's
``MinhashDedupSignature``, plus the exact key and shingle set of every document).
Stage 2: datatrove ``MinhashDedupBuckets`` (a task per band): candidate pairs across all tasks.
Stage 3: :class:`Clusters` (one task): confirms candidates by exact Jaccard, groups exact and near
duplicates, writes each stage-1 task's remove list.
Stage 4 (a task per stage-1 task): :class:`ReadClean` → :class:`DropDuplicates` → :class:`TokenShards`.
Stage 5: :class:`Manifest` (one task): sums the counts, names the shards in task order, writes the manifest.

Every step that counts writes ``counts/<step>-<task>.json`` when its task ends; a task that is rerun
rewrites its own files, so the sums are right however often tasks were killed and resubmitted.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from megadeep.data import dedup
from megadeep.data.cleaning import normalize, quality_failure
from megadeep.data.pii import scrub
from megadeep.data.shards import ShardWriter, token_dtype, write_manifest
from megadeep.data.tokenizer import open_tokenizer


class Work:
    """The layout of a run's working directory (``OUT/.work``)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.root = self.out / ".work"
        for name in ("clean", "sigs", "buckets", "keys", "shingles", "remove", "counts", "shards", "logs"):
            setattr(self, name, self.root / name)


def save_counts(work: Work, step: str, rank: int, counts: dict) -> None:
    path = work.counts / f"{step}-{rank:05d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(counts))
    os.replace(tmp, path)


def minhash_config(s) -> MinhashConfig:
    bands, rows = dedup.lsh_bands(s.threshold, s.num_perm)
    # sha1 hash_fc: not used (shingles are ours), but the default (xxhash) would need another package
    return MinhashConfig(n_grams=s.ngram, num_buckets=bands, hashes_per_bucket=rows, seed=s.seed,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


class Clean(PipelineStep):
    """Bad records, normalisation, quality rules and PII scrubbing; everything counted per reason.

    megadeep's own rules, not datatrove's ``GopherQualityFilter``/``GopherRepetitionFilter`` and
    ``PIIFormatter``. The Gopher filters do run offline (spaCy 3.8 blank English pipeline, no model),
    but measured per CPU-second on 1 MB of prose: spaCy's word tokenizer alone 0.89 MB/s, and
    ``GopherQualityFilter`` and ``GopherRepetitionFilter`` 0.3 MB/s each, against megadeep's byte-level
    rules at ~31 MB/s and an end-to-end target of 1.8 MB/s per core: either filter alone would cap
    preprocessing at a sixth of it. The PII formatter (10 MB/s) only knows e-mails and IPs, replaced by
    fake addresses, uncounted; megadeep also finds phone and card numbers and puts one-token
    placeholders, counted (see ``pii.py``)."""

    name = "megadeep clean"

    def __init__(self, work: Work, settings):
        super().__init__()
        self.work, self.s = work, settings

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        s, c = self.s, Counter()
        dropped, pii, clock = Counter(), Counter(), Counter()
        t = time.process_time()
        for doc in data:
            t0 = time.process_time()
            clock["read"] += t0 - t
            c["documents_in"] += 1
            c["bytes_in"] += doc.metadata["nbytes"]
            reason = doc.metadata.get("drop")
            if reason is None:
                text = normalize(doc.text, s.normalization)
                t1 = time.process_time()
                reason = quality_failure(text, s.quality)
                t2 = time.process_time()
                clock["normalize"] += t1 - t0
                clock["quality"] += t2 - t1
            if reason is not None:
                dropped[reason] += 1
                t = time.process_time()
                continue
            if s.pii:
                text, found = scrub(text)
                doc.metadata["pii"] = dict(found)
            doc.text = text
            clock["pii"] += time.process_time() - t2
            yield doc
            t = time.process_time()  # the steps after this one ran during the yield: not ours
        save_counts(self.work, "clean", rank, {**c, "dropped": dropped, "seconds": clock})


class _NoWordTokenizer(WordTokenizer):
    """Shingles are megadeep's (:func:`megadeep.data.dedup.shingles`); this only keeps datatrove from
    loading spaCy for a word tokenizer that is never called."""

    def word_tokenize(self, text):
        raise NotImplementedError

    sent_tokenize = span_tokenize = word_tokenize


class Signatures(MinhashDedupSignature):
    """datatrove's MinHash stage 1 (band files, sorted, per task) with megadeep's shingles and hashes;
    it also keeps what the cluster stage needs: each document's exact key and sorted shingle set."""

    name = "megadeep signatures"

    def __init__(self, work: Work, settings):
        super().__init__(str(work.sigs), minhash_config(settings.dedup), language=_NoWordTokenizer())
        self.work, self.s = work, settings.dedup
        self.a, self.b = dedup.permutations(self.num_hashes, self.s.seed)

    def get_shingles(self, text: str) -> np.ndarray:
        """Called by datatrove once per document, in order: record the key and shingles on the way."""
        t0 = time.process_time()
        self._keys.append(np.frombuffer(dedup.exact_key(text), np.uint64))
        sh = np.unique(dedup.shingles(text, self.s.ngram)) if self.s.near else np.zeros(0, np.uint32)
        self._shingle_file.write(sh.tobytes())
        self._ends.append(self._ends[-1] + len(sh))
        self._clock += time.process_time() - t0
        return sh.reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        t0 = time.process_time()
        sig = dedup.minhash(shingles[:, 0], self.a, self.b)
        self._clock += time.process_time() - t0
        return [x.tolist() for x in np.split(sig, self.config.num_buckets)]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        self.work.shingles.mkdir(parents=True, exist_ok=True)
        self.work.keys.mkdir(parents=True, exist_ok=True)
        self._keys, self._ends, self._clock = [], [0], 0.0
        with open(self.work.shingles / f"{rank:05d}.bin", "wb") as self._shingle_file:
            if self.s.near:
                super().run(data, rank, world_size)
            else:  # exact keys only: no band files
                for doc in data:
                    self.get_shingles(doc.text)
        np.save(self.work.shingles / f"{rank:05d}.idx.npy", np.asarray(self._ends, np.int64))
        keys = np.stack(self._keys) if self._keys else np.zeros((0, 2), np.uint64)
        np.save(self.work.keys / f"{rank:05d}.npy", keys)
        save_counts(self.work, "signatures", rank, {"seconds": {"dedup_signature": self._clock}})


class Clusters(PipelineStep):
    """One task: confirmed near-duplicate pairs and exact groups → per-task remove lists."""

    name = "megadeep dedup clusters"

    def __init__(self, work: Work, settings, tasks: int):
        super().__init__()
        self.work, self.s, self.tasks = work, settings.dedup, tasks

    def _shingle_sets(self, task: int):
        return (np.memmap(self.work.shingles / f"{task:05d}.bin", np.uint32, "r")
                if os.path.getsize(self.work.shingles / f"{task:05d}.bin") else np.zeros(0, np.uint32),
                np.load(self.work.shingles / f"{task:05d}.idx.npy"))

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        t0 = time.process_time()
        keys = [np.load(self.work.keys / f"{t:05d}.npy") if self.s.exact else np.zeros((0, 2), np.uint64)
                for t in range(self.tasks)]
        pairs = np.zeros((0, 4), np.uint32)
        candidates = same_text = 0
        if self.s.near and self.work.buckets.is_dir():
            found = [np.fromfile(f, np.uint32).reshape(-1, 4) for f in sorted(self.work.buckets.glob("*.dups"))]
            pairs = dedup.unique_pairs(np.concatenate([pairs, *found]))
            candidates = len(pairs)
            if self.s.exact:  # exact duplicates are grouped anyway: their Jaccard would change nothing
                pairs = pairs[~dedup.same_exact_key(keys, pairs)]
                same_text = candidates - len(pairs)
            sets = {}
            keep = np.zeros(len(pairs), bool)
            for i, (t1, d1, t2, d2) in enumerate(pairs.tolist()):
                for t in (t1, t2):
                    if t not in sets:
                        sets[t] = self._shingle_sets(t)
                (b1, e1), (b2, e2) = sets[t1], sets[t2]
                keep[i] = dedup.jaccard(b1[e1[d1]:e1[d1 + 1]], b2[e2[d2]:e2[d2 + 1]]) >= self.s.threshold
            pairs = pairs[keep]
        removed = dedup.clusters(keys, pairs)
        self.work.remove.mkdir(parents=True, exist_ok=True)
        by_task: dict[int, list] = {t: [] for t in range(self.tasks)}
        for (t, d), reason in removed.items():
            by_task[t].append((d, reason))
        for t, rows in by_task.items():
            np.save(self.work.remove / f"{t:05d}.npy", np.asarray(sorted(rows), np.int64).reshape(-1, 2))
        save_counts(self.work, "clusters", 0, {"candidate_pairs": candidates, "exact_duplicate_pairs": same_text,
                                               "confirmed_pairs": len(pairs),
                                               "seconds": {"dedup_index": time.process_time() - t0}})


class ReadClean(PipelineStep):
    """Stage 4's input: this task's clean documents from stage 1, in the order they were signed."""

    name = "megadeep read clean"

    def __init__(self, work: Work):
        super().__init__()
        self.work = work

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if (self.work.clean / f"{rank:05d}.jsonl").is_file():
            yield from JsonlReader(str(self.work.clean), compression=None).read_file(f"{rank:05d}.jsonl")


class DropDuplicates(PipelineStep):
    """Drops the documents of this task's remove list (by index in the stream), counted per reason.
    Like datatrove's ``MinhashDedupFilter``, but with two reasons instead of one."""

    name = "megadeep drop duplicates"

    def __init__(self, work: Work):
        super().__init__()
        self.work = work

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        remove = dict(map(tuple, np.load(self.work.remove / f"{rank:05d}.npy").tolist()))
        dropped = Counter()
        for i, doc in enumerate(data):
            if i in remove:
                dropped[dedup.REASONS[remove[i]]] += 1
                continue
            yield doc
        save_counts(self.work, "duplicates", rank, {"dropped": dropped})


class TokenShards(PipelineStep):
    """Tokenises the kept documents in batches and writes this task's token shards."""

    name = "megadeep token shards"

    def __init__(self, work: Work, tokenizer: str, settings):
        super().__init__()
        self.work, self.tokenizer, self.s = work, tokenizer, settings

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        tok = open_tokenizer(self.tokenizer)
        out = self.work.shards / f"{rank:05d}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        writer = ShardWriter(out, tok.vocab_size, tok.eos_id, self.s.shard_tokens)
        c, pii, clock = Counter(), Counter(), Counter()
        batch, size = [], 0

        def flush():
            t0 = time.process_time()
            ids = tok.encode_batch([d.text for d in batch])
            t1 = time.process_time()
            for d, tokens in zip(batch, ids):
                c["documents_kept"] += 1
                c["bytes_kept"] += d.metadata["nbytes"]
                c["tokens"] += len(tokens) + 1
                pii.update(d.metadata.get("pii", {}))
                writer.add(tokens)
            clock["tokenize"] += t1 - t0
            clock["write"] += time.process_time() - t1
            batch.clear()

        for doc in data:
            batch.append(doc)
            size += len(doc.text)
            if size >= self.s.batch_bytes:
                flush()
                size = 0
        flush()
        t0 = time.process_time()
        writer.flush()
        clock["write"] += time.process_time() - t0
        save_counts(self.work, "shards", rank, {**c, "pii_replaced": pii, "shards": writer.shards, "seconds": clock})


class Manifest(PipelineStep):
    """One task: sums every task's counts, moves the shards into ``OUT`` named in task order, copies the
    tokenizer and writes the manifest (last, atomically: a directory with a manifest is complete)."""

    name = "megadeep manifest"

    def __init__(self, work: Work, tokenizer: str, tasks: int, header: dict):
        super().__init__()
        self.work, self.tokenizer, self.tasks, self.header = work, tokenizer, tasks, header

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        stats = {"documents_in": 0, "documents_kept": 0, "bytes_in": 0, "bytes_kept": 0, "tokens": 0}
        dropped, pii, seconds = Counter(), Counter(), Counter()
        shards = []
        for path in sorted(self.work.counts.glob("*.json")):
            c = json.loads(path.read_text())
            for k in stats:
                stats[k] += c.get(k, 0)
            dropped.update(c.get("dropped", {}))
            pii.update(c.get("pii_replaced", {}))
            seconds.update(c.get("seconds", {}))
            if path.name.startswith("shards-"):
                task = path.stem.split("-")[1]
                shards += [(self.work.shards / task, s) for s in c["shards"]]
        if stats["documents_in"] != stats["documents_kept"] + sum(dropped.values()):
            raise RuntimeError(f"preprocessing counts do not reconcile: {stats}, dropped {dict(dropped)}")
        listed = []
        for i, (src, s) in enumerate(shards):
            name = f"shard_{i:05d}"
            for suffix in (".bin", ".idx.npy"):
                if (src / f"{s['name']}{suffix}").is_file():  # already moved by an earlier, killed attempt
                    os.replace(src / f"{s['name']}{suffix}", self.work.out / f"{name}{suffix}")
            listed.append({**s, "name": name})
        files = open_tokenizer(self.tokenizer).files()
        for f in files:
            shutil.copyfile(f, self.work.out / f.name)
        tok = open_tokenizer(self.work.out / files[0].name)
        stats.update(dropped=dict(sorted(dropped.items())), pii_replaced=dict(sorted(pii.items())),
                     stage_seconds={k: round(v, 4) for k, v in sorted(seconds.items())})
        manifest = {"tokenizer": {"file": files[0].name, **tok.identity()}, "dtype": token_dtype(tok.vocab_size).name,
                    "documents": stats["documents_kept"], "tokens": stats["tokens"], "shards": listed,
                    "stats": stats, **self.header}
        write_manifest(self.work.out, manifest)
        for name in ("clean", "sigs", "buckets", "keys", "shingles", "remove", "shards"):  # logs and counts stay
            shutil.rmtree(getattr(self.work, name), ignore_errors=True)
