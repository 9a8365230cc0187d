"""Reading a metrics file back as the run it describes. A run that resumed from a checkpoint repeats
the steps after it (a node failure or ``scontrol requeue`` loses the work since the last periodic
save) and appends them to the same file, after a restart record; readers take the run as it stands,
so no step is counted twice."""
from __future__ import annotations

import json
from pathlib import Path

from megadeep.errors import ConfigError

RESTART = "restart"  # the "event" of a restart record: restart, resumed_from_step, hosts, world_size


def read_metrics(path: Path) -> list[dict]:
    """Every JSON record of the file, in order (unreadable lines counted and skipped)."""
    if not path.is_file():
        raise ConfigError(f"metrics file '{path}' does not exist")
    records, bad = [], 0
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1  # a run killed mid-write leaves a partial last line
    if not records:
        raise ConfigError(f"metrics file '{path}' holds no JSON records")
    if bad:
        print(f"megadeep: skipped {bad} unreadable line(s) in {path}")
    return records


def _kind(record: dict) -> str:
    return record.get("event") or ("eval" if "val_loss" in record else "train")


def current(records: list[dict]) -> list[dict]:
    """The records of the run as it stands: a restart record drops what the attempts before it logged
    after the step it resumed from, and of several records of one kind for one step the last wins."""
    kept: list[dict] = []
    for r in records:
        if r.get("event") == RESTART:
            kept = [k for k in kept if _kind(k) == RESTART or k["step"] <= r["resumed_from_step"]]
        kept.append(r)
    last: dict[tuple, int] = {}
    for i, r in enumerate(kept):
        last[(_kind(r), i if _kind(r) == RESTART else r["step"])] = i
    return [kept[i] for i in sorted(last.values())]


def read_run(path: Path) -> list[dict]:
    """:func:`current` of the file: what plots and tools should read."""
    return current(read_metrics(path))
