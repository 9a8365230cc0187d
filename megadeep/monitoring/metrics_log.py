"""Per-step metrics on rank 0: a JSON-lines file, TensorBoard events, and a progress bar (rich on a
terminal, one line per ``log.log_every`` steps in a batch log)."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from megadeep.config.schema import RunConfig
from megadeep.monitoring.flops import flops_per_token, mfu


def memory_mb(device: torch.device) -> dict[str, float]:
    """Peak device memory on GPU; current and peak resident set on CPU."""
    if device.type == "cuda":
        return {"max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"rss_mb": rss_pages * resource.getpagesize() / 2**20,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _scalars(record: dict, prefix: str = ""):
    """Flatten a record to (tag, number) pairs for TensorBoard."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and key != "step" and value is not None:
            yield prefix + key, value


class MetricsLog:
    def __init__(self, cfg: RunConfig, world_size: int, peak_flops: float | None, enabled: bool):
        log = cfg.log
        self.enabled, self.total = enabled, cfg.train.steps
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.world_size, self.peak = world_size, peak_flops
        self.log_every = max(1, log.log_every)
        self.start = time.time()
        self.file = self.tb = self.bar = None
        if not enabled:
            return
        if log.metrics_file:
            Path(log.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(log.metrics_file, "a", buffering=1)
        if log.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log.tensorboard_dir)
        self.lines = log.progress and not sys.stdout.isatty()
        if log.progress and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=self.total, info="")
            self.bar.start()

    def step(self, record: dict) -> dict:
        """Add throughput-derived metrics to a step record and emit it. Returns the full record."""
        per_device = record["tokens_per_s"] / self.world_size
        record["tflops_per_device"] = per_device * self.flops_per_token / 1e12
        record["mfu"] = mfu(per_device, self.flops_per_token, self.peak)
        self._emit(record)
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], info=self._summary(record))
        elif self.enabled and self.lines and (record["step"] % self.log_every == 0 or record["step"] == self.total):
            done = record["step"] / self.total
            eta = (time.time() - self.start) * (1 - done) / done
            print(f"step {record['step']:>6}/{self.total} | {self._summary(record)} | eta {_fmt_duration(eta)}",
                  flush=True)
        return record

    def restart(self, record: dict) -> None:
        """A start that continues earlier work: readers drop what was logged after its resume step."""
        from megadeep.monitoring.records import RESTART

        self._emit({"event": RESTART, **record, "time": time.time()})

    def evaluation(self, step: int, val_loss: float) -> None:
        self._emit({"step": step, "val_loss": val_loss})
        if self.enabled and (self.lines or self.bar is not None):
            message = f"step {step:>6}/{self.total} | val loss {val_loss:.4f}"
            (self.bar.console.print if self.bar is not None else print)(message)

    def _summary(self, r: dict) -> str:
        parts = [f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if r.get("grad_norm") is not None:
            parts.append(f"grad norm {r['grad_norm']:.3f}")
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        return " | ".join(parts)

    def _emit(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for tag, value in _scalars(record) if "step" in record else ():
                self.tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
