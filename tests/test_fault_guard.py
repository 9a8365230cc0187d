"""The fault guard's bookkeeping: K skipped steps in a row abort naming a checkpoint, spikes flagged."""
import math

import pytest

from megadeep.errors import RunAborted
from megadeep.training.guard import FaultGuard
from megadeep.training.trainer import StepResult


def step(i, loss, skipped=False):
    return StepResult(i, loss, 1e-3, math.inf if skipped else 1.0, 0.0, 0.0, skipped)


def test_skips_are_counted_and_a_streak_aborts(tmp_path):
    guard = FaultGuard(max_consecutive_skips=3, spike_factor=3.0, enabled_log=False)
    for i, skipped in enumerate([False, True, True, False, True, True], 1):
        guard.observe(step(i, math.nan if skipped else 2.0, skipped))
        guard.check(tmp_path / "step_00000001")  # two in a row, reset, two again: no abort
    assert guard.consecutive == 2
    guard.observe(step(7, math.nan, True))
    with pytest.raises(RunAborted, match=r"3 non-finite steps in a row; the last good checkpoint is .*step_00000001"):
        guard.check(tmp_path / "step_00000001")


def test_loss_spikes_are_flagged_after_warmup():
    guard = FaultGuard(max_consecutive_skips=3, spike_factor=2.0, enabled_log=False, warmup=5)
    results = [step(i, loss) for i, loss in enumerate([3.0] * 4 + [9.0] + [3.0] * 5 + [7.0, 3.1], 1)]
    for r in results:
        guard.observe(r)
    assert [r.step for r in results if r.loss_spike] == [11]  # step 5 is inside the warm-up
