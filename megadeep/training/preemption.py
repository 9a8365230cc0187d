"""SIGUSR1 — SLURM's warning that the time limit is near — turned into a stop at a step boundary; under
SLURM also SIGTERM (what ``scancel`` and ``scontrol requeue`` send before SIGKILL), so those end with a
checkpoint instead of a killed rank.

The handler only sets a flag: saving from inside a handler could interrupt a collective half-way. The
ranks may see the signal in different steps, so after every step they agree with one all-reduce (MAX)
whether anyone saw it, and all stop after the same step. No torch import at the top: ``python -m
megadeep train`` installs the handler before anything else loads, so a signal during start-up is kept,
not fatal; and :func:`ignore_from_now` turns it into SIG_IGN before the interpreter exits, because
CPython puts back the default action (terminate) of every signal it handled during finalization, so a
USR1 in the last milliseconds of a rank would otherwise kill it with status 138 and fail the job.
"""
from __future__ import annotations

import os
import signal
import threading


class StopRequest:
    """The installed handler; it remembers the signal until the trainer has acted on it (of two
    signals, the larger number: TERM, a cancel, outranks USR1, a requeue)."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = max(self.signum or 0, signum)

    def clear(self) -> None:
        self.signum = None


def stop_signals(env=None) -> tuple[int, ...]:
    """USR1 always; TERM only inside a SLURM job, where SIGKILL follows it after KillWait anyway (a
    local run keeps TERM's default, so a stuck rank still stops on it)."""
    env = os.environ if env is None else env
    return (signal.SIGUSR1, signal.SIGTERM) if "SLURM_JOB_ID" in env else (signal.SIGUSR1,)


def install() -> StopRequest:
    """Handle the stop signals from now on (idempotent: returns the handler already installed, so the
    early install in ``python -m megadeep`` keeps signals that arrive while torch and DeepSpeed load)."""
    current = signal.getsignal(signal.SIGUSR1)
    handler = current if isinstance(current, StopRequest) else StopRequest()
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        for signum in stop_signals():
            signal.signal(signum, handler)
    return handler


def ignore_from_now() -> None:
    """Before exit: ignore the stop signals this process handles (a stop it can no longer act on)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in stop_signals():
        if isinstance(signal.getsignal(signum), StopRequest):
            signal.signal(signum, signal.SIG_IGN)


def any_rank_requested(request: StopRequest, device) -> int:
    """The stop signal any rank received (the largest), the same on every rank; 0 if none. Collective."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(request.signum or 0)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
