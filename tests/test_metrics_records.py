"""A metrics file after restarts reads as the run it describes: each step once, the latest attempt's."""
import json

from megadeep.cli import main
from megadeep.monitoring.plot import panel_series
from megadeep.monitoring.records import current, read_run


def step(n, loss, attempt):
    return {"step": n, "loss": loss, "lr": 1e-3, "tokens_per_s": 100.0 * attempt, "mfu": 0.1}


def restart(k, resumed_from):
    return {"event": "restart", "restart": k, "resumed_from_step": resumed_from, "hosts": ["n1"], "world_size": 1}


def test_restart_records_drop_the_cut_short_steps_and_plot_each_step_once(tmp_path):
    # attempt 1 runs steps 1-6 (evaluation at 4) and is requeued without a save: the last periodic
    # checkpoint is step 3; attempt 2 redoes 4-5 and saves at 5 (USR1); attempt 3 resumes at 5 and is
    # at step 5 when the file is read: attempt 1's step 6 is no longer part of the run.
    records = [step(1, 9, 1), step(2, 8, 1), step(3, 7, 1), step(4, 6, 1), {"step": 4, "val_loss": 6.5},
               step(5, 5, 1), step(6, 4, 1),
               restart(1, 3), step(4, 6.1, 2), {"step": 4, "val_loss": 6.6}, step(5, 5.1, 2),
               restart(2, 5)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')  # killed mid-write
    run = read_run(path)
    steps = [(r["step"], r["loss"]) for r in run if "loss" in r]
    assert steps == [(1, 9), (2, 8), (3, 7), (4, 6.1), (5, 5.1)]
    assert [r["val_loss"] for r in run if "val_loss" in r] == [6.6]
    assert [r["restart"] for r in run if r.get("event") == "restart"] == [1, 2]
    assert current(run) == run  # reading twice changes nothing
    # without the restart records the last record per step still wins (a fresh run appended to a file)
    assert [r["loss"] for r in current([step(1, 9, 1), step(1, 8, 2)])] == [8]

    series = panel_series(run)
    assert [s for s, _ in series["loss"]["loss"]] == [1, 2, 3, 4, 5]
    assert series["loss"]["val_loss"] == [(4, 6.6)]
    assert main(["plot", str(path), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 5000
