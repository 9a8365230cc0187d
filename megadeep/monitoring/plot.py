"""``megadeep plot METRICS.jsonl``: PNG plots of a run's metrics file, for people who would rather look."""
from __future__ import annotations

import argparse
from pathlib import Path

from megadeep.monitoring.records import read_run

PANELS = [  # file name, y label, record keys plotted against step
    ("loss", "loss", ["loss", "val_loss"]),
    ("lr", "learning rate", ["lr"]),
    ("throughput", "tokens / s", ["tokens_per_s"]),
    ("mfu", "MFU", ["mfu"]),
]


def panel_series(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per panel, per key: the (step, value) points to draw."""
    return {name: {k: [(r["step"], r[k]) for r in records if r.get(k) is not None] for k in keys}
            for name, _, keys in PANELS}


def plot(path: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panel_series(read_run(path))  # a step repeated after a restart is drawn once
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ylabel, _ in PANELS:
        series = panels[name]
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, points in series.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key == "val_loss" else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{path.name}: {ylabel}")
        fig.tight_layout()
        target = out_dir / f"{name}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def cmd_plot(args: argparse.Namespace) -> int:
    path = Path(args.metrics)
    for p in plot(path, Path(args.out) if args.out else path.parent / "plots"):
        print(p)
    return 0


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG plots (loss, lr, throughput, MFU) of a metrics JSON-lines file")
    p.add_argument("metrics", help="the run's log.metrics_file")
    p.add_argument("--out", default="", help="output directory (default: plots/ beside the metrics file)")
    p.set_defaults(func=cmd_plot)
