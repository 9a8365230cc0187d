"""Random streams that agree where the model is replicated and differ where it is split.

The default generator carries the same seed on every TP rank of a replica: dropout on replicated
activations (the residual stream) then draws identical masks, as it must. Inside a TP region — on
attention heads that live on one rank, or on a sequence-parallel shard — each rank forks to its own
stream (``seed + 2718 + tp_rank``, Megatron's offset) so shards do not share masks.

Activation checkpointing must replay the same masks: :func:`checkpoint` restores the tracked streams
for the recomputation.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

from megadeep.parallel import groups

TP_STREAM = "tensor-parallel"
TP_SEED_OFFSET = 2718


def _get_state(device_type: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type: str, state: torch.Tensor) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    def __init__(self, device_type: str = "cpu"):
        self.device_type = device_type
        self.states: dict[str, torch.Tensor] = {}

    def reset(self, device_type: str) -> None:
        self.device_type = device_type
        self.states.clear()

    def add(self, name: str, seed: int) -> None:
        saved = _get_state(self.device_type)
        if self.device_type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state(self.device_type)
        _set_state(self.device_type, saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TP_STREAM):
        """Draw from stream ``name`` inside the block; the default stream is left untouched."""
        if name not in self.states:
            yield  # no streams set up (single-process use): the default generator is the stream
            return
        saved = _get_state(self.device_type)
        _set_state(self.device_type, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device_type)
            _set_state(self.device_type, saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def seed_everything(seed: int, device_type: str) -> None:
    """Default stream: ``seed`` + 100·pp_rank (stages hold different layers); TP stream per TP rank."""
    import random

    import numpy as np

    default = seed + 100 * groups.get_pipeline_model_parallel_rank()
    random.seed(default)
    np.random.seed(default % 2**32)
    torch.manual_seed(default)
    if device_type == "cuda":
        torch.cuda.manual_seed(default)
    _TRACKER.reset(device_type)
    _TRACKER.add(TP_STREAM, default + TP_SEED_OFFSET + groups.get_tensor_model_parallel_rank())


def checkpoint(fn, *args):
    """Activation checkpointing that replays the tracker's streams exactly during recomputation."""
    saved = _TRACKER.get_states()

    @contextlib.contextmanager
    def replay():
        current = _TRACKER.get_states()
        _TRACKER.set_states(saved)
        try:
            yield
        finally:
            _TRACKER.set_states(current)

    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), replay())
    )
