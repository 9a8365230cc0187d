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
