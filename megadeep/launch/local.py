"""``--nproc N``: start N local ranks with torchrun (PyTorch's own launcher), which also kills the
surviving ranks when one fails.

No rank outlives the launcher. torchrun starts each rank in a session of its own, so killing the
launcher's process group does not reach them, and a SIGKILLed parent cannot clean up. So the kernel
does it: the torchrun agent runs under :func:`die_with_parent` (SIGTERM when this CLI dies; torchrun
then stops its ranks), every rank too (SIGKILL when the agent dies), and the CLI forwards SIGTERM,
SIGINT and SIGHUP to the agent.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from megadeep.config.load import dump_json
from megadeep.config.schema import RunConfig

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
AGENT_ENV = "MEGADEEP_AGENT_PID"  # set by the agent for its ranks: the parent they must not outlive
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 20  # after a forwarded signal, how long torchrun may take to stop its ranks


def die_with_parent(sig: int, parent: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent (pid ``parent``) exits; if it
    already has, take ``sig`` now. A no-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl: we were reparented already
        os.kill(os.getpid(), sig)


def guard_rank() -> None:
    """In a rank started by :func:`run_local`'s agent: die with the agent."""
    agent = os.environ.get(AGENT_ENV)
    if agent:
        die_with_parent(signal.SIGKILL, int(agent))


class _Forwarded(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _raise(signum, frame):
    raise _Forwarded(signum)


def run_local(cfg: RunConfig, nproc: int, command: str = "train", args: tuple[str, ...] = ()) -> int:
    """Run ``megadeep COMMAND`` (train, memory) for the resolved ``cfg`` on ``nproc`` processes of
    this machine, with ``args`` after the config; returns the exit code."""
    with tempfile.TemporaryDirectory(prefix="megadeep-") as tmp:
        resolved = Path(tmp) / "config.json"
        dump_json(cfg, resolved)
        return run_ranks(nproc, [command, str(resolved), *args])


def run_ranks(nproc: int, argv: list[str]) -> int:
    """Run ``megadeep ARGV...`` on ``nproc`` processes of this machine under the torchrun agent;
    returns the exit code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "megadeep.launch.local", str(os.getpid()), "--standalone",
           f"--nproc_per_node={nproc}", "-m", "megadeep", *argv]
    previous = {s: signal.signal(s, _raise) for s in FORWARDED}
    agent = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return agent.wait()
    except _Forwarded as stop:
        agent.send_signal(stop.signum)
        try:
            agent.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            agent.kill()
        return 128 + stop.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if agent.poll() is None:
            agent.kill()
            agent.wait()

if __name__ == "__main__":  # the torchrun agent: python -m megadeep.launch.local PARENT_PID TORCHRUN_ARGS...
    die_with_parent(signal.SIGTERM, int(sys.argv[1]))
    os.environ[AGENT_ENV] = str(os.getpid())
    from torch.distributed.run import main

    main(sys.argv[2:])
