"""Per-step metrics on rank 0: a JSON-lines file and a progress line on the console."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLog:
    """Writes one JSON object per optimizer step (and per validation pass) and prints progress."""

    def __init__(self, path: str, total_steps: int, enabled: bool, progress: bool, log_every: int = 1):
        self.enabled, self.progress, self.log_every = enabled, progress and enabled, max(1, log_every)
        self.total_steps = total_steps
        self.start = time.time()
        self.file = None
        if enabled and path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        if self.progress and ("val_loss" in record or step % self.log_every == 0 or step == self.total_steps):
            print(self._line(record), file=sys.stdout, flush=True)

    def _line(self, r: dict) -> str:
        if "val_loss" in r:
            return f"step {r['step']:>6}/{self.total_steps} | val loss {r['val_loss']:.4f}"
        done = r["step"] / self.total_steps
        elapsed = time.time() - self.start
        eta = elapsed * (1 - done) / done if done > 0 else float("inf")
        parts = [f"step {r['step']:>6}/{self.total_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if r.get("grad_norm") is not None:
            parts.append(f"grad norm {r['grad_norm']:.3f}")
        parts += [f"{r['tokens_per_s']:,.0f} tok/s", f"eta {_fmt_duration(eta)}"]
        return " | ".join(parts)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
