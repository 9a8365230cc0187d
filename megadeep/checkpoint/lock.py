"""One run owns its checkpoint dir: a lock file naming the owner (host, pid, SLURM job), taken
before any rank starts.

A second run on the same dir is refused with the owner's name instead of writing concurrently into
it. A lock whose owner is gone (same host, pid no longer running that process; or an earlier start
of this same SLURM job, which a requeue implies has ended) is stale and taken over with a warning.
An owner on another host cannot be checked from here: it counts as alive, and the message says
which file to remove if that run is known to be gone.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from megadeep.errors import ConfigError

log = logging.getLogger("megadeep.checkpoint")
LOCK = ".megadeep.lock"
HELD_ENV = "MEGADEEP_CKPT_LOCK"  # the lock file a launcher holds for the ranks it starts


def _start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_ticks(pid),
            "job": os.environ.get("SLURM_JOB_ID", ""), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _alive(owner: dict, mine: dict) -> bool:
    if not owner:
        return False  # unreadable: the lock is written whole (os.link), so this is debris, not a run
    if owner.get("job") and owner.get("job") == mine["job"]:
        return False  # an earlier start of this job: a requeued job's previous run has ended
    if owner.get("host") != mine["host"]:
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _start_ticks(pid)
    return owner.get("start") is None or start is None or start == owner["start"]


def _read(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    job = f", SLURM job {owner['job']}" if owner.get("job") else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}{job}, since {owner.get('since', '?')}"


def acquire(root: Path) -> Path:
    """Take ``root``'s lock for this process, or raise :class:`ConfigError` naming its owner."""
    root.mkdir(parents=True, exist_ok=True)
    path, mine = root / LOCK, me()
    tmp = root / f"{LOCK}.{mine['host']}.{mine['pid']}"
    tmp.write_text(json.dumps(mine) + "\n")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic: the lock appears with its content, or not at all
                return path
            except FileExistsError:
                owner = _read(path)
                if owner is None:
                    continue  # released meanwhile
                if _alive(owner, mine):
                    raise ConfigError(f"checkpoint.dir={root} is in use by another run ({_describe(owner)}); "
                                      f"wait for it, use another checkpoint.dir, or delete {path} if that run is gone")
                log.warning(f"megadeep: warning: taking over the stale lock {path} of a run that is gone "
                            f"({_describe(owner)})")
                path.unlink(missing_ok=True)
        raise ConfigError(f"could not take the lock {path}: other runs keep taking it")
    finally:
        tmp.unlink(missing_ok=True)


def release(path: Path) -> None:
    owner = _read(path)
    mine = me()
    if owner and owner.get("pid") == mine["pid"] and owner.get("host") == mine["host"]:
        path.unlink(missing_ok=True)


@contextmanager
def holding(directory: str, rank: int = 0):
    """Hold ``directory``'s lock for the duration (rank 0 only; nothing when a launcher above this
    process already holds it, or when there is no checkpoint dir)."""
    if not directory or rank != 0 or os.environ.get(HELD_ENV) == str(Path(directory).absolute() / LOCK):
        yield
        return
    path = acquire(Path(directory).absolute())
    os.environ[HELD_ENV] = str(path)  # the ranks this process starts inherit it
    try:
        yield
    finally:
        os.environ.pop(HELD_ENV, None)
        release(path)
