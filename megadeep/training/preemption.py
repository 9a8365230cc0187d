"""SIGUSR1 — SLURM's warning that the time limit is near — turned into a stop at a step boundary.

The handler only sets a flag: saving from inside a handler could interrupt a collective half-way. The
ranks may see the signal in different steps, so after every step they agree with one all-reduce (MAX)
whether anyone saw it, and all stop after the same step. No torch import at the top: the CLI installs
the handler before loading torch, so a signal during start-up is kept, not fatal.
"""
from __future__ import annotations

import signal
import threading


class StopRequest:
    """The installed handler; it remembers the signal until the trainer has acted on it."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum

    def clear(self) -> None:
        self.signum = None


def install(signum: int = signal.SIGUSR1) -> StopRequest:
    """Handle ``signum`` from now on (idempotent: returns the handler already installed, so an early
    install in the CLI keeps signals that arrive while torch and DeepSpeed load)."""
    current = signal.getsignal(signum)
    if isinstance(current, StopRequest):
        return current
    handler = StopRequest()
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
        signal.signal(signum, handler)
    return handler


def any_rank_requested(request: StopRequest, device) -> bool:
    """True on every rank if any rank received the signal. Collective."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(request.signum is not None)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
