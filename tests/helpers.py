"""Shared test helpers: multi-process workers under torchrun, tiny configs, a synthetic text."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
WORDS = ("the of and to a in is it you that he was for on are with as his they be at one have this from "
         "or had by word but what some we can out other were all there when up use your how said an each "
         "she which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over").split()


def write_text(path: Path, n_words: int = 20000, seed: int = 0) -> Path:
    """Deterministic pseudo-English with learnable structure (word spelling, spaces, line breaks)."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 14):
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    path.write_text("\n".join(lines) + "\n")
    return path


def run_torchrun(script: str, nproc: int, *args: str, timeout: float = 600, env: dict | None = None,
                 check: bool = True):
    """Run ``tests/workers/<script>`` on ``nproc`` processes; fail with its output if it fails (``check``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKERS / script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} on {nproc} ranks failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_parity(out: Path, text: Path, specs: list[str], nproc: int = 1) -> dict:
    """Train ``specs`` with ``workers/parity.py`` on ``nproc`` ranks (1: a plain process, the
    single-process reference); returns its per-spec results."""
    if nproc == 1:
        proc = subprocess.run([sys.executable, str(WORKERS / "parity.py"), str(out), str(text), *specs],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-5000:]
    else:
        run_torchrun("parity.py", nproc, str(out), str(text), *specs)
    results = read_json(out)
    assert sorted(results) == sorted(specs)
    return results


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def rel_err(a, b) -> float:
    """max |a-b| / max |b|, the tolerance measure used by the parity tests."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
