"""``--nproc N``: start N local ranks with torchrun (PyTorch's own launcher), which also kills the
surviving ranks when one fails."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megadeep.config.load import dump_json
from megadeep.config.schema import RunConfig


def run_local(cfg: RunConfig, nproc: int, command: str = "train", args: tuple[str, ...] = ()) -> int:
    """Run ``megadeep COMMAND`` (train, memory) for the resolved ``cfg`` on ``nproc`` processes of
    this machine, with ``args`` after the config; returns the exit code."""
    with tempfile.TemporaryDirectory(prefix="megadeep-") as tmp:
        resolved = Path(tmp) / "config.json"
        dump_json(cfg, resolved)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megadeep", command, str(resolved), *args]
        return subprocess.run(cmd, env=env).returncode
