"""Hang detection: a rank that stops making progress (SIGSTOPped, a dead node, a collective that never
completes) ends the job within ``train.hang_timeout_s`` instead of at the time limit.

Why not torch's collective timeout: it fires only inside a collective, after ``dist_timeout_s``, and
cannot say which rank is missing. Here each rank's watchdog thread writes a heartbeat (rank, host, pid,
last step, time) to ``checkpoint.dir/.heartbeat`` every few seconds; a rank blocked in a collective
keeps beating, a stopped or dead one does not. When this rank has not finished a step for the timeout,
the ranks whose heartbeat is stale are the silent ones: the message names them and the last step, and
under SLURM the job step is killed (``scancel --signal=KILL``, which also ends stopped processes on other
nodes); elsewhere the rank exits and the launcher (torchrun) stops the others.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

HANG_EXIT = 124  # timeout(1)'s "timed out"


class Watchdog:
    def __init__(self, directory: str, rank: int, world_size: int, timeout_s: float):
        self.dir = Path(directory) / ".heartbeat"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size, self.timeout = rank, world_size, timeout_s
        self.interval = max(0.2, min(5.0, timeout_s / 10))
        self.step, self.last = 0, time.monotonic()
        self.host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="megadeep-watchdog", daemon=True)
        self._thread.start()

    def progress(self, step: int) -> None:
        """The main loop finished ``step``; the heartbeat says so now (a beat only from the thread could
        name a step before the last one this rank finished, if it stops between two beats)."""
        self.step, self.last = step, time.monotonic()
        self._beat()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        with self._lock:  # the main loop (progress) and the thread both beat
            beat = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self.step, "time": time.time()}
            path = self.dir / f"rank_{self.rank:05d}.json"
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, path)  # readers never see half a heartbeat

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()
            if time.monotonic() - self.last > self.timeout:
                self._fire()

    def silent_ranks(self, now: float | None = None) -> list[dict]:
        """Heartbeats (or ``{"rank": r}`` for none) older than a few beat intervals."""
        now = time.time() if now is None else now
        silent = []
        for r in range(self.world_size):
            try:
                beat = json.loads((self.dir / f"rank_{r:05d}.json").read_text())
            except (OSError, ValueError):
                silent.append({"rank": r})
                continue
            if now - beat["time"] > 3 * self.interval + 1:
                silent.append(beat)
        return silent

    def _fire(self) -> None:
        silent = self.silent_ranks()
        who = ", ".join(f"rank {b['rank']} ({b['host']}, pid {b['pid']}, last step {b['step']})" if "host" in b
                        else f"rank {b['rank']} (no heartbeat)" for b in silent) or "none (all alive but stuck)"
        live = sorted(set(range(self.world_size)) - {b["rank"] for b in silent})
        speaker = not live or self.rank == live[0]  # one rank speaks for all
        if speaker:
            print(f"megadeep: hang: no step finished for {self.timeout:.0f} s after step {self.step} "
                  f"(train.hang_timeout_s); silent: {who}; ending the job", flush=True)
        time.sleep(1 if speaker else 3)  # the message reaches the job log before the step is killed
        job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
        if job and step:
            subprocess.run(["scancel", "--signal=KILL", f"{job}.{step}"], capture_output=True, timeout=30)
        os._exit(HANG_EXIT)
