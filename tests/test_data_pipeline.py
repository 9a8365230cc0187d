"""Preprocessing: near/exact dedup, PII scrubbing, bad input accounting, shards, manifest checks, CLI."""
import json
import os
import random

import numpy as np
import pytest

from megadeep.cli import main
from megadeep.config.load import settings_from_overrides
from megadeep.config.schema import DataConfig
from megadeep.data.dataset import token_split
from megadeep.data.dedup import shingles
from megadeep.data.pii import scrub
from megadeep.data.preprocess import PreprocessSettings, preprocess
from megadeep.data.tokenizer import Tokenizer, TokenizerSettings, train_tokenizer
from megadeep.errors import DataError
from tests.helpers import WORDS

VOCAB = WORDS + list(f"{w}{s}" for w in WORDS[:60] for s in ("s", "ed", "er"))  # ~280 words


def doc(rng: random.Random, n_words: int = 240) -> str:
    """Pseudo-English sentences over ~280 words: word 5-grams of two documents practically never collide."""
    words = [rng.choice(VOCAB) for _ in range(n_words)]
    lines, i = [], 0
    while i < len(words):
        k = rng.randint(6, 14)
        lines.append(" ".join(words[i:i + k]).capitalize() + ".")
        i += k
    return "\n".join(lines)


def edit(rng: random.Random, text: str, n_edits: int) -> str:
    """An edited copy: a few words replaced, inserted or deleted, and the layout and case changed."""
    words = text.split()
    for _ in range(n_edits):
        i = rng.randrange(len(words))
        op = rng.choice(("replace", "insert", "delete"))
        if op == "replace":
            words[i] = rng.choice(VOCAB)
        elif op == "insert":
            words.insert(i, rng.choice(VOCAB))
        else:
            del words[i]
    out = " ".join(words)
    return out.upper() if rng.random() < 0.3 else out.replace(". ", ".\n\n")


def jaccard(a: str, b: str) -> float:
    x, y = set(shingles(a, 5).tolist()), set(shingles(b, 5).tolist())
    return len(x & y) / len(x | y)


def write_jsonl(path, texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer((doc(rng) for _ in range(300)), out, TokenizerSettings(vocab_size=600), threads=1)
    return str(out)


def run(tmp_path, inputs, tokenizer, *overrides, name="out"):
    s = settings_from_overrides(PreprocessSettings, ["workers=1", *overrides])
    return preprocess(inputs, tmp_path / name, tokenizer, s)


def test_near_duplicates_removed_distinct_kept(tmp_path, tokenizer):
    rng = random.Random(1)
    originals = [doc(rng) for _ in range(120)]
    boilerplate = doc(rng, 30)
    distinct = [doc(rng) for _ in range(80)]
    distinct += [boilerplate + "\n" + doc(rng) for _ in range(40)]  # share a header paragraph
    halves = [(doc(rng, 120), doc(rng, 120), doc(rng, 120)) for _ in range(20)]
    distinct += [a + "\n" + b for a, b, _ in halves] + [a + "\n" + c for a, _, c in halves]  # share half (J≈1/3)
    copies = [edit(rng, t, rng.randint(1, 4)) for t in originals]
    similarity = [jaccard(c, o) for c, o in zip(copies, originals)]
    assert min(similarity) >= 0.8  # the planted copies are near-duplicates at the 0.8 threshold ...
    assert max(jaccard(a + "\n" + b, a + "\n" + c) for a, b, c in halves) < 0.5  # ... the related docs are not

    inputs = [write_jsonl(tmp_path / "docs.jsonl", originals + distinct + copies)]
    m = run(tmp_path, inputs, tokenizer, "dedup.threshold=0.8")
    dropped = m["stats"]["dropped"]
    n_in = len(originals) + len(distinct) + len(copies)
    assert m["stats"]["documents_in"] == n_in
    assert dropped.get("near_duplicate", 0) >= 0.95 * len(copies), dropped
    assert m["documents"] == n_in - sum(dropped.values())
    assert m["documents"] >= len(originals) + len(distinct)  # no original or distinct document removed
    # which ones were kept: the stream holds the originals and every distinct doc, in input order
    tok = Tokenizer(tokenizer)
    stream = np.fromfile(tmp_path / "out" / "shard_00000.bin", dtype=m["dtype"])
    docs = np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]
    expected = [np.append(tok.encode(t), tok.eos_id) for t in originals + distinct]
    assert all(np.array_equal(a, b) for a, b in zip(docs, expected))


def test_exact_duplicates_always_removed(tmp_path, tokenizer):
    rng = random.Random(2)
    texts = [doc(rng) + " Straße, café." for _ in range(30)]
    # "STRASSE, CAFÉ" is "Straße, café" after Unicode case folding
    variants = [t.upper() for t in texts[:10]] + [t.replace("\n", "  \n ") for t in texts[10:20]] + texts[20:]
    inputs = [write_jsonl(tmp_path / "a.jsonl", texts + variants)]
    for near in ("true", "false"):
        m = run(tmp_path, inputs, tokenizer, f"dedup.near={near}", name=near)
        assert m["stats"]["dropped"] == {"exact_duplicate": 30}, m["stats"]["dropped"]
        assert m["documents"] == 30


PII = {
    "email": ["john.doe@example.com", "a_b-c+tag@mail.co.uk"],
    "phone": ["+1 (555) 123-4567", "555-123-4567", "(555) 123-4567", "+44 20 7946 0958", "555.123.4567"],
    "ip": ["192.168.1.20", "10.0.0.1", "2001:db8:85a3::8a2e:370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
    "card": ["4111 1111 1111 1111", "4111-1111-1111-1111", "4012888888881881", "3782 822463 10005"],
}
ORDINARY = [
    "In 1603 Hamlet was printed.", "Act 3, Scene 2, line 56.", "On 2024-03-05 at 12:30:45 it rained.",
    "It costs $1,299.99 or 1.299,99 EUR.", "Python 3.11.2 and numpy 2.4.6 installed.", "version 1.2.3.4.5 built",
    "Population: 8,336,817 people.", "ISBN 978-3-16-148410-0", "Room 101, zip 90210.", "pi is 3.14159265358979",
    "2+2=4 and 10/3=3.33", "order #12345678 shipped", "timestamp 2024-03-05T12:30:45Z", "scores 21-14 and 3-0",
    "in 1999-2004 the ratio was 3:2", "std::vector<int> a; foo::bar()", "ID 1234567890123456 of 2",
    "from 1234 5678 to 9012", "see pages 555-557", "1,234,567,890 stars", "dead::beef is not an address",
]


def test_pii_scrubbed_ordinary_digits_untouched(tmp_path, tokenizer):
    for kind, values in PII.items():
        for v in values:
            out, counts = scrub(f"Contact: {v}, thanks.")
            assert out == f"Contact: <{kind.upper()}>, thanks." and counts == {kind: 1}, (v, out)
    for text in ORDINARY:
        assert scrub(text) == (text, {}), text
    # through the pipeline: counted in the manifest, placeholders are single tokens, PII is gone
    rng = random.Random(3)
    planted = [doc(rng) + f"\nWrite to {v} today." for values in PII.values() for v in values]
    m = run(tmp_path, [write_jsonl(tmp_path / "p.jsonl", planted + [doc(rng) + "\n" + t for t in ORDINARY])], tokenizer)
    assert m["stats"]["pii_replaced"] == {k: len(v) for k, v in PII.items()}
    tok = Tokenizer(tokenizer)
    text = tok.decode(np.fromfile(tmp_path / "out" / "shard_00000.bin", dtype=m["dtype"]).tolist())
    assert not any(v in text for values in PII.values() for v in values)
    assert all(t in text for t in ORDINARY)
    assert tok.encode("<EMAIL>").tolist() == [tok.sp.piece_to_id("<EMAIL>")]


def test_bad_input_counted_with_reasons(tmp_path, tokenizer):
    rng = random.Random(4)
    good = [doc(rng) for _ in range(5)]
    long_line = json.dumps({"text": "word " * 2_100_000}).encode()  # a 10.5 MB single line
    lines = [json.dumps({"text": t}).encode() for t in good[:3]] + [
        b'{"text": "caf\xe9 au lait, ' + b"and more words " * 20 + b'"}',  # latin-1 byte: invalid UTF-8
        b"", b"   ", json.dumps({"text": "  \n  "}).encode(),  # empty
        b'{"text": "unterminated', b"[1, 2", b"plain words",  # invalid JSON
        json.dumps({"body": good[3]}).encode(), json.dumps({"text": 5}).encode(), b"[]",  # missing field
        long_line,
        json.dumps({"text": "too short"}).encode(),
    ]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "ok.txt").write_text(good[4])
    (tmp_path / "latin1.txt").write_bytes(good[0].encode() + b"\n\xff\xfe end")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    (tmp_path / "oneline.txt").write_bytes(b"x" * 10_000_000)
    inputs = [str(jsonl), *(str(tmp_path / f) for f in ("ok.txt", "latin1.txt", "empty.txt", "blank.txt", "oneline.txt"))]
    expected = {"invalid_utf8": 2, "empty": 5, "invalid_json": 3, "missing_field": 3, "long_line": 2,
                "too_few_words": 1}
    m = run(tmp_path, inputs, tokenizer)
    s = m["stats"]
    assert s["dropped"] == expected, s["dropped"]
    assert s["documents_in"] == len(lines) + 5 == s["documents_kept"] + sum(s["dropped"].values())
    assert s["documents_kept"] == m["documents"] == 4
    assert s["bytes_in"] == sum(os.path.getsize(p) for p in inputs)  # every byte read is accounted for
    # a document limit refuses the 10 MB inputs unread
    m = run(tmp_path, inputs, tokenizer, "max_doc_bytes=1000000", name="capped")
    assert m["stats"]["dropped"]["too_large"] == 2 and "long_line" not in m["stats"]["dropped"]
    assert m["stats"]["documents_in"] == len(lines) + 5
    assert m["stats"]["bytes_in"] == s["bytes_in"]


def test_workers_and_shards_do_not_change_the_output(tmp_path, tokenizer):
    rng = random.Random(5)
    texts = [doc(rng, rng.randint(60, 400)) for _ in range(200)]
    inputs = [write_jsonl(tmp_path / "a.jsonl", texts[:120]), write_jsonl(tmp_path / "b.jsonl", texts[120:])]
    one = run(tmp_path, inputs, tokenizer, "tasks=1", "shard_tokens=1000000", name="one")
    two = run(tmp_path, inputs, tokenizer, "workers=2", "batch_bytes=20000", "shard_tokens=7000", name="two")
    assert len(one["shards"]) == 1 and len(two["shards"]) > 3
    streams = [np.concatenate([np.fromfile(tmp_path / n / f"{s['name']}.bin", dtype=m["dtype"]) for s in m["shards"]])
               for n, m in (("one", one), ("two", two))]
    assert np.array_equal(*streams) and len(streams[0]) == one["tokens"] == two["tokens"]
    assert two["stats"]["workers"] == 2 and one["documents"] == two["documents"] == 200
    # packed samples read across shard boundaries the same way
    a = token_split(DataConfig(paths=[str(tmp_path / "one")], val_fraction=0.1), 32, 0)
    b = token_split(DataConfig(paths=[str(tmp_path / "two")], val_fraction=0.1), 32, 0)
    idx = np.arange(len(a.train))
    assert len(a.train) == len(b.train) and np.array_equal(a.train.rows(idx), b.train.rows(idx))
    assert np.array_equal(a.val.rows(np.arange(len(a.val))), b.val.rows(np.arange(len(b.val))))


def test_corrupted_or_missing_shard_is_detected(tmp_path, tokenizer):
    rng = random.Random(6)
    run(tmp_path, [write_jsonl(tmp_path / "a.jsonl", [doc(rng) for _ in range(50)])], tokenizer, "shard_tokens=3000")
    d = DataConfig(paths=[str(tmp_path / "out")])
    token_split(d, 16, 0)  # intact: opens
    shard = tmp_path / "out" / "shard_00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard_00001.bin fails its sha256 check"):
        token_split(d, 16, 0)
    shard.write_bytes(bytes(data[:-2]))
    d.verify_checksums = False  # sizes are always checked
    with pytest.raises(DataError, match="truncated"):
        token_split(d, 16, 0)
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        token_split(d, 16, 0)
    with pytest.raises(DataError, match="no dataset manifest"):
        token_split(DataConfig(paths=[str(tmp_path)]), 16, 0)


def test_data_cli_end_to_end(tmp_path, capsys):
    rng = random.Random(7)
    corpus = write_jsonl(tmp_path / "c.jsonl", [doc(rng) for _ in range(200)] + ["bad"])
    assert main(["data", "train-tokenizer", corpus, "--out", str(tmp_path / "tok"), "--vocab-size", "500"]) == 0
    assert main(["data", "preprocess", corpus, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "ds"),
                 "--workers", "1", "--set", "quality.min_words=100"]) == 0
    out = capsys.readouterr().out
    assert "documents in        201" in out and "too_few_words" in out and "MB/s" in out
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 500 and manifest["settings"]["quality"]["min_words"] == 100
    assert (tmp_path / "ds" / "tokenizer.model").is_file()
    # refuses to overwrite, and a bad setting is one line
    assert main(["data", "preprocess", corpus, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "ds")]) == 2
    assert main(["data", "preprocess", corpus, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "x"),
                 "--set", "dedup.treshold=0.7"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not empty; pass --overwrite" in err[0] and "unknown config key 'dedup.treshold'" in err[1]
