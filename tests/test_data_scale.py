"""Preprocessing scaled out on datatrove: cross-task near-dedup recall, same shards from 1 worker, 2 workers,
Parquet, compressed JSON lines and a SLURM job (killed and resubmitted), bad records, refusals."""
import gzip
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megadeep.cli import main
from megadeep.config.load import settings_from_overrides
from megadeep.data import steps
from megadeep.data.preprocess import PreprocessSettings, preprocess
from megadeep.data.tokenizer import Tokenizer
from megadeep.errors import DataError
from tests.helpers import ROOT
from tests.test_data_pipeline import doc, edit, jaccard, tokenizer, write_jsonl  # noqa: F401 (fixture)


def run(tmp_path, inputs, tokenizer, *overrides, name="out"):
    s = settings_from_overrides(PreprocessSettings, ["workers=1", *overrides])
    return preprocess(inputs, tmp_path / name, tokenizer, s)


def stream(out, m) -> np.ndarray:
    return np.concatenate([np.fromfile(out / f"{s['name']}.bin", dtype=m["dtype"]) for s in m["shards"]])


def near_copy(rng, text, lo, hi):
    """An edited copy whose exact word-5-gram Jaccard with ``text`` is in [lo, hi]."""
    n = 1
    while True:
        c = edit(rng, text, n)
        j = jaccard(c, text)
        if lo <= j <= hi:
            return c
        n = max(1, n + (1 if j > hi else -1))


def test_cross_file_near_duplicates_recall_and_precision(tmp_path, tokenizer):
    """For each of 3 seeds, 40 planted pairs at exact J 0.835-0.92 split across files (tasks): removed
    (≥ 97% over the seeds; the pipeline before datatrove found 34 of 40); 40 pairs at J 0.55-0.75 (below
    the 0.8 threshold) and 80 distinct documents: all kept. One run over the 3 seeds' 12 files."""
    inputs, kept = [], []
    for seed in range(3):
        rng = random.Random(100 + seed)
        originals = [doc(rng) for _ in range(40)]
        copies = [near_copy(rng, t, 0.835, 0.92) for t in originals]
        related = [doc(rng) for _ in range(40)]
        below = [near_copy(rng, t, 0.55, 0.75) for t in related]
        distinct = [doc(rng) for _ in range(80)]
        inputs += [write_jsonl(tmp_path / f"{seed}a.jsonl", originals + related[:20]),
                   write_jsonl(tmp_path / f"{seed}b.jsonl", distinct),
                   write_jsonl(tmp_path / f"{seed}c.jsonl", below[:20] + copies[::2] + related[20:]),
                   write_jsonl(tmp_path / f"{seed}d.jsonl", copies[1::2] + below[20:])]
        kept += [originals + related[:20], distinct, below[:20] + related[20:], below[20:]]
    m = run(tmp_path, inputs, tokenizer, "workers=2")
    dropped = m["stats"]["dropped"]
    assert set(dropped) == {"near_duplicate"} and dropped["near_duplicate"] >= 0.97 * 120, dropped
    assert m["documents"] == 3 * 240 - dropped["near_duplicate"]
    # precision: no original, related, below-threshold or distinct document was removed, and with
    # every copy found the kept stream is exactly theirs, in input order
    assert m["documents"] >= 3 * 200
    if dropped["near_duplicate"] == 120:
        tok = Tokenizer(tokenizer)
        expected = np.concatenate([np.append(tok.encode(t), tok.eos_id) for part in kept for t in part])
        assert np.array_equal(stream(tmp_path / "out", m), expected)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four JSON-lines files with exact and near duplicates across files, PII and bad records."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(11)
    texts = [doc(rng, rng.randint(60, 300)) for _ in range(160)]
    texts[5] += "\nMail john.doe@example.com or call +1 (555) 123-4567."
    files = [texts[i::4] for i in range(4)]
    files[1] += [texts[0].upper(), near_copy(rng, texts[2], 0.85, 0.95)]  # dups of docs in files[0] and [2]
    files[3] += [texts[1].replace("\n", " \n"), near_copy(rng, texts[4], 0.85, 0.95), "too short"]
    paths = [write_jsonl(d / f"part{i}.jsonl", f) for i, f in enumerate(files)]
    with open(paths[2], "ab") as f:
        f.write(b'{"text": "\\ud800 lone surrogate"}\n{"text": broken\n')
    return d, paths, files


def test_candidate_pairs_deduplicated_and_exact_pairs_found():
    """The cluster stage's own row de-duplication agrees with np.unique(axis=0), order included, and it
    finds the candidate pairs whose documents are exact duplicates (grouped without a Jaccard check)."""
    from megadeep.data import dedup

    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 3, (500, 4)).astype(np.uint32)
    pairs[:100, 1::2] = rng.integers(0, 1 << 32, (100, 2), dtype=np.uint64).astype(np.uint32)  # high bits too
    pairs = np.concatenate([pairs, pairs[::3], pairs[5:9]])
    assert np.array_equal(dedup.unique_pairs(pairs), np.unique(pairs, axis=0))
    assert dedup.unique_pairs(pairs[:0]).shape == (0, 4)
    keys = [np.array([[1, 2], [3, 4]], np.uint64), np.zeros((0, 2), np.uint64), np.array([[3, 4], [1, 5]], np.uint64)]
    found = dedup.same_exact_key(keys, np.array([[0, 1, 2, 0], [0, 0, 2, 1], [0, 0, 0, 1], [2, 0, 0, 1]], np.uint32))
    assert found.tolist() == [True, False, False, True]


def test_workers_parquet_and_compressed_inputs_give_identical_shards(tmp_path, tokenizer, corpus):
    d, paths, files = corpus
    one = run(tmp_path, paths, tokenizer, name="one")
    two = run(tmp_path, paths, tokenizer, "workers=2", "shard_tokens=2000", name="two")
    s = one["stats"]
    assert s["dropped"] == {"exact_duplicate": 2, "near_duplicate": 2, "too_few_words": 1, "invalid_utf8": 1,
                            "invalid_json": 1}, s["dropped"]
    assert s["documents_in"] == 160 + 5 + 2 == s["documents_kept"] + sum(s["dropped"].values())
    assert s["pii_replaced"] == {"email": 1, "phone": 1}
    assert two["stats"]["workers"] == 2 and len(two["shards"]) > len(one["shards"]) == 4
    assert list(two["stats"]["stage_wall_seconds"]) == ["clean", "buckets", "clusters", "tokenize", "manifest"]
    ref = stream(tmp_path / "one", one)
    assert np.array_equal(ref, stream(tmp_path / "two", two)) and len(ref) == one["tokens"] == two["tokens"]
    for k in ("documents_in", "documents_kept", "dropped", "pii_replaced", "bytes_in", "bytes_kept"):
        assert one["stats"][k] == two["stats"][k], k
    # the same documents as Parquet (text column among others), .jsonl.gz and .jsonl.zst
    import zstandard

    alt = tmp_path / "inputs"
    alt.mkdir()
    inputs = []
    for i, p in enumerate(paths):
        raw = open(p, "rb").read()
        if i == 2:  # the bad records stay JSON lines; the rest of the file is compressed
            (alt / "part2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
            inputs.append(str(alt / "part2.jsonl.zst"))
        elif i == 3:
            (alt / "part3.jsonl.gz").write_bytes(gzip.compress(raw))
            inputs.append(str(alt / "part3.jsonl.gz"))
        else:
            table = pa.table({"id": list(range(len(files[i]))), "text": files[i]})
            pq.write_table(table, alt / f"part{i}.parquet", row_group_size=7)
            inputs.append(str(alt / f"part{i}.parquet"))
    with pytest.raises(DataError, match="has no column 'content'"):
        run(tmp_path, inputs, tokenizer, "json_field=content", name="nocolumn")
    m = run(tmp_path, inputs, tokenizer, "workers=2", name="alt")
    assert np.array_equal(ref, stream(tmp_path / "alt", m))
    assert m["stats"]["dropped"] == s["dropped"] and m["documents"] == one["documents"]


def test_bad_files_and_refusals(tmp_path, tokenizer, capsys, monkeypatch):
    rng = random.Random(12)
    good = [doc(rng) for _ in range(42)]
    # a UTF-8 BOM before the first record, and a .gz cut off in the middle
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}) + "\n" for t in good[:2]).encode())
    whole = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in good[2:]).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    m = run(tmp_path, [str(bom), str(cut)], tokenizer, "dedup.exact=false", "dedup.near=false")
    s = m["stats"]
    assert s["dropped"] == {"corrupt_file": 1} and 2 + 10 <= s["documents_kept"] < 42, s
    assert s["documents_in"] == s["documents_kept"] + 1
    # a corrupt tokenizer model, a corpus with no usable document, absurd settings: one line, exit 2, fast
    (tmp_path / "bad.model").write_bytes(b"not a model")
    args = ["data", "preprocess", str(bom), "--out", str(tmp_path / "x"), "--workers", "1"]
    assert main([*args, "--tokenizer", str(tmp_path / "bad.model")]) == 2
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "too short", "  "])
    assert main(["data", "train-tokenizer", empty, "--out", str(tmp_path / "tok2"), "--vocab-size", "400"]) == 2
    start = time.perf_counter()
    assert main([*args, "--tokenizer", tokenizer, "--set", "dedup.num_perm=100000000"]) == 2
    assert main([*args, "--tokenizer", tokenizer, "--tasks", "5"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4, err
    assert "is not a SentencePiece model" in err[0] and "no usable document" in err[1]
    assert "dedup.num_perm" in err[2] and "tasks=5" in err[3]
    # a failed run leaves --out rerunnable: the same command resumes (here: after a worker crashed)
    out = tmp_path / "resume"

    def crash(*a, **k):
        raise RuntimeError("worker lost")

    with monkeypatch.context() as mp:
        mp.setattr(steps.TokenShards, "run", crash)
        with pytest.raises(RuntimeError, match="worker lost"):
            run(tmp_path, [str(bom)], tokenizer, name="resume")
    assert not (out / "manifest.json").exists() and not (out / "tokenizer.model").exists()
    assert run(tmp_path, [str(bom)], tokenizer, name="resume")["documents"] == 2


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "megadeep", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**env, **kw.pop("env", {})}, timeout=120, **kw)


def _wait(path, cluster, timeout):
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            jobs = cluster.run("squeue", "-h", check=False).stdout
            raise AssertionError(f"{path} did not appear in {timeout} s; queue:\n{jobs}")
        time.sleep(0.5)


def test_slurm_job_same_shards_and_resumes_after_kill(tmp_path, tokenizer, corpus, slurm_cluster):
    d, paths, _ = corpus
    local = run(tmp_path, paths, tokenizer, name="local")
    out = tmp_path / "slurm"
    args = ["data", "preprocess", *paths, "--tokenizer", tokenizer, "--out", str(out), "--slurm"]
    env = {"SLURM_CONF": str(slurm_cluster.conf)}
    # one stage-1 task at a time, so the job can be killed with some tasks done and some not
    first = _cli(*args, "--max-parallel", "1", env=env)
    assert first.returncode == 0, first.stderr
    done = out / ".work" / "logs" / "clean" / "completions"
    deadline = time.time() + 90
    while not (done.is_dir() and len(os.listdir(done)) >= 1):
        assert time.time() < deadline, slurm_cluster.run("squeue", "-h", check=False).stdout
        time.sleep(0.2)
    jobs = slurm_cluster.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
    slurm_cluster.run("scancel", *set(jobs))
    while slurm_cluster.run("squeue", "-h", check=False).stdout.strip():
        time.sleep(0.2)
    finished = sorted(os.listdir(done))
    assert 1 <= len(finished) < 4 and not (out / "manifest.json").exists()
    stamps = {f: os.stat(done / f).st_mtime_ns for f in finished}
    logs = {f: os.stat(done.parent / "logs" / f"task_{f}.log").st_mtime_ns for f in finished}
    # resubmitted: the finished tasks are not run again, and the output is the local run's
    second = _cli(*args, env=env)
    assert second.returncode == 0, second.stderr
    ranks = json.loads((done.parent / "ranks_to_run.json").read_text())
    assert sorted(ranks) == sorted(set(range(4)) - {int(f) for f in finished})
    _wait(out / "manifest.json", slurm_cluster, 240)
    assert {f: os.stat(done / f).st_mtime_ns for f in finished} == stamps
    assert {f: os.stat(done.parent / "logs" / f"task_{f}.log").st_mtime_ns for f in finished} == logs
    m = json.loads((out / "manifest.json").read_text())
    assert np.array_equal(stream(out, m), stream(tmp_path / "local", local))
    for k in ("documents_in", "documents_kept", "dropped", "pii_replaced"):
        assert m["stats"][k] == local["stats"][k], k
    assert [s["bin_sha256"] for s in m["shards"]] == [s["bin_sha256"] for s in local["shards"]]
