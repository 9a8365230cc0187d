"""Fault guards: skip updates with a non-finite loss or gradient (all ranks together), stop after too
many in a row, and flag loss spikes against a running mean.

Who skips: DeepSpeed's ZeRO 1/2/3, bf16 and fp16 optimizers already refuse a step whose global grad
norm is inf/NaN (``overflow``: no optimizer step, no LR-scheduler step, ``skipped_steps`` += 1). The
norm is reduced over DP and TP, so every rank takes the same decision. A non-finite loss makes the
gradients non-finite too, so it is covered by the same check. Only ZeRO 0 in fp32 has no wrapper and
would step into NaN: there megadeep's own clipping hook skips it (``training.grad_norm``).
"""
from __future__ import annotations

import logging

from megadeep.errors import RunAborted

log = logging.getLogger("megadeep.training")


class FaultGuard:
    def __init__(self, max_consecutive_skips: int, spike_factor: float, enabled_log: bool,
                 warmup: int = 10, beta: float = 0.95):
        self.max_consecutive = max_consecutive_skips
        self.spike_factor, self.warmup, self.beta = spike_factor, warmup, beta
        self.enabled_log = enabled_log
        self.consecutive = 0
        self.mean: float | None = None
        self.seen = 0

    def observe(self, result) -> None:
        """Account for one optimizer step and set ``result.loss_spike``."""
        if result.skipped:
            self.consecutive += 1
            if self.enabled_log:
                log.warning(f"megadeep: warning: step {result.step}: non-finite loss or gradient "
                            f"(loss {result.loss}, grad norm {result.grad_norm}); update skipped "
                            f"({self.consecutive} in a row)")
            return
        self.consecutive = 0
        loss = result.loss
        if self.mean is not None and self.seen >= self.warmup and self.spike_factor > 0:
            result.loss_spike = loss > self.spike_factor * self.mean
            if result.loss_spike and self.enabled_log:
                log.warning(f"megadeep: warning: loss spike at step {result.step}: {loss:.4f} is "
                            f"{loss / self.mean:.1f}× the running mean {self.mean:.4f}")
        self.mean = loss if self.mean is None else self.beta * self.mean + (1 - self.beta) * loss
        self.seen += 1

    def check(self, last_good) -> None:
        """Stop the run (every rank sees the same counts) after too many skipped steps in a row."""
        if self.consecutive >= self.max_consecutive:
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
            raise RunAborted(f"{self.consecutive} non-finite steps in a row; {where}: "
                             "lower optim.lr or fix the data, then resume from it")
