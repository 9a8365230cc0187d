"""What every benchmark shares: timing with warm-up and medians, and writing results to bench/results/."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    import os

    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": _dt.datetime.now().isoformat(timespec="seconds")}


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{_dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=1))
    return path


def row(what: str, megadeep: float, baseline: float | None = None, ratio: float | None = None) -> dict:
    """One headline row of the runner's table (``python -m bench``): what is measured (units and the
    baseline named in ``what``), megadeep's number, the baseline's, and their ratio (megadeep / baseline
    unless the benchmark computes it otherwise, e.g. as a median of per-repeat ratios)."""
    if ratio is None and baseline:
        ratio = megadeep / baseline
    return {"what": what, "megadeep": megadeep, "baseline": baseline, "ratio": ratio}


def worker_cli(name: str, doc: str | None, run, worker, report, extra: tuple[str, ...] = ()) -> None:
    """The command line of a benchmark that re-launches itself in rank processes: ``--worker OUT --shape
    JSON [--EXTRA ...]`` runs ``worker(shape, *extras, OUT)`` in a rank; otherwise ``run(quick)`` runs the
    benchmark, ``report`` prints it, and a full (not ``--quick``) run is saved as ``bench/results/NAME-*``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", default="")
    ap.add_argument("--shape", default="")
    for e in extra:
        ap.add_argument(f"--{e}", default="")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.shape), *(getattr(args, e) for e in extra), args.worker)
        return
    result = run(args.quick)
    report(result)
    if not args.quick:
        print("saved", save(name, result))


def launch_workers(module: str, nproc: int, out: Path, shape: dict, threads: int = 1, **extra: str) -> dict:
    """Run ``python -m MODULE --worker OUT --shape JSON`` in ``nproc`` torchrun ranks and read OUT."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, "--worker", str(out), "--shape", json.dumps(shape)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.read_text())
