"""Checkpoint save and load time of megadeep's format next to DeepSpeed's native
``save_checkpoint``/``load_checkpoint`` on the same engine, in the same run (one process, fp32, ZeRO-1),
and the stall an asynchronous save puts on training.

megadeep's save also hashes every byte (sha256) and fsyncs; its load verifies the hashes first. The
ratios say what that safety costs. DeepSpeed's ``save_checkpoint`` (TorchCheckpointEngine, 0.19.8) does
not fsync at all: its files may still be in the page cache when it returns. So the save is compared two
ways: against DeepSpeed as it is, and against DeepSpeed followed by an fsync of every file it wrote
(like for like); megadeep's own fsync time is reported as its share (never dropped: a checkpoint is
never half-written).

The stall: the step that triggers a background save (its ``train_step`` + ``after_step``) against a
normal step plus the snapshot to host memory, and the steps that run while the save is written.
"Total save time" of an async save is snapshot + background write/hash/fsync with training paused
(``async_paused_total_s``: the save's own work, what DeepSpeed's synchronous save is timed doing). The
same save while training runs (``async_while_training_s``) shares 2 cores with the training step, so
its wall time is inflated by design; it is reported, with the time the steps meanwhile lost.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.common import median_time, row, save

SHAPE = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048)  # ~134M parameters
QUICK = dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, ffn_dim=768)


def run(quick: bool = False) -> dict:
    from megadeep.checkpoint.manager import TrainState
    from megadeep.config import load_config, resolve
    from megadeep.model import num_params
    from megadeep.training.trainer import Trainer

    s = QUICK if quick else SHAPE
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        text = work / "text.txt"
        text.write_bytes(bytes(range(256)) * 4096)
        cfg = resolve(load_config(None, [
            f"model.vocab_size={s['vocab_size']}", f"model.dim={s['dim']}", f"model.n_layers={s['n_layers']}",
            f"model.n_heads={s['n_heads']}", f"model.ffn_dim={s['ffn_dim']}", "model.max_seq_len=128",
            "train.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=2", "train.steps=100",
            "deepspeed.config=zero1", "data.val_fraction=0", f"data.paths=[{text}]", "log.progress=false",
            f"checkpoint.dir={work / 'megadeep'}", "checkpoint.keep_last=1",
        ]), 1)
        trainer = Trainer(cfg)
        engine, manager = trainer.engine, trainer.checkpoints
        step_s = median_time(trainer.train_step, repeats=2)
        stall = measure_stall(trainer, manager, step_s)
        state = TrainState(trainer.step, trainer.train_data.consumed)
        repeats = 9  # a save's wall swings 0.7-3.4 s on this VM (first touch of page-cache memory)
        ds_dir = work / "deepspeed"
        ds_save_new = lambda: new_tag(engine, ds_dir)  # noqa: E731
        saves = interleaved({"megadeep": lambda: manager.save(state), "deepspeed": ds_save_new}, repeats)
        ours_save, ds_save = saves["median_s"]["megadeep"], saves["median_s"]["deepspeed"]
        synced = interleaved({"megadeep": lambda: timed_fsync(lambda: manager.save(state)),
                              "deepspeed+fsync": lambda: fsync_tree(ds_dir / ds_save_new())}, repeats)
        fsync_share = statistics.median(fsync_s)
        paused = measure_paused(manager, state)
        cfg.checkpoint.resume = str(manager.last_good)
        ours_load = median_time(manager.resume, repeats=repeats)
        ds_load = median_time(lambda: engine.load_checkpoint(str(ds_dir), tag=_ds_saves[-1].name), repeats=repeats)
        size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
        result = {
            "params": num_params(cfg.model), "train_step_s": step_s,
            "megadeep_save_s": ours_save, "deepspeed_save_s": ds_save, "save_ratio": saves["ratio"],
            "save_samples_s": saves["samples_s"],
            "deepspeed_fsynced_save_s": synced["median_s"]["deepspeed+fsync"],
            "save_ratio_vs_deepspeed_fsynced": synced["ratio"],
            "save_ratio_of_medians": saves["ratio_of_medians"],
            "save_ratio_of_medians_vs_deepspeed_fsynced": synced["ratio_of_medians"], "fsynced_samples_s": synced["samples_s"],
            "megadeep_fsync_s": fsync_share, **paused,
            "async_paused_over_deepspeed": paused["async_paused_total_s"] / ds_save,
            "load_avg": os.getloadavg(),
            "megadeep_load_s": ours_load, "deepspeed_load_s": ds_load, "load_ratio": ours_load / ds_load,
            "megadeep_bytes": size(manager.last_good), "deepspeed_bytes": size(_ds_saves[-1]),
            **stall, "async_while_training_over_deepspeed": stall["async_while_training_s"] / ds_save,
        }
        trainer.close()
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def interleaved(fns: dict, repeats: int) -> dict:
    """Time the two ``fns`` alternately (A, B, B, A, ...: a load swing hits both), each from a clean page
    cache; the ratio is the median of per-round ratios first/second."""
    import statistics
    import time

    (a, fa), (b, fb) = fns.items()
    fa(), fb()  # warm: files exist, buffers allocated
    samples = {a: [], b: []}
    for i in range(repeats):
        for name, fn in ((a, fa), (b, fb)) if i % 2 == 0 else ((b, fb), (a, fa)):
            settle()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {"median_s": {n: statistics.median(v) for n, v in samples.items()}, "samples_s": samples,
            "ratio": statistics.median(x / y for x, y in zip(samples[a], samples[b])),
            "ratio_of_medians": statistics.median(samples[a]) / statistics.median(samples[b])}


def new_tag(engine, ds_dir: Path) -> str:
    """DeepSpeed's save as a training run makes it: into a new tag (``global_stepN``), with the previous
    one still on disk, as megadeep writes a new directory before it drops the old one. (Overwriting one
    tag would reuse the pages the kernel just freed, which on this VM is several times faster than
    memory the guest has not touched lately.) ``settle`` removes the superseded tags, untimed."""
    tag = f"t{len(_ds_saves)}"
    engine.save_checkpoint(str(ds_dir), tag=tag)
    _ds_saves.append(ds_dir / tag)
    return tag


_ds_saves: list[Path] = []  # every DeepSpeed checkpoint the bench wrote, the newest last


def settle() -> None:
    """Write back every dirty page before a timed save: DeepSpeed returns with its ~1.7 GB still in the
    page cache, and the kernel flushing it during the next sample (megadeep's, which fsyncs) would bill
    one side for the other's writes. DeepSpeed tags older than the newest are deleted first."""
    for old in _ds_saves[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    os.sync()


fsync_s: list[float] = []


def timed_fsync(fn) -> None:
    """Run ``fn`` and record the seconds it spent inside ``os.fsync`` (megadeep's fsync share)."""
    import time

    real, spent = os.fsync, [0.0]

    def fsync(fd):
        start = time.perf_counter()
        real(fd)
        spent[0] += time.perf_counter() - start

    os.fsync = fsync
    try:
        fn()
    finally:
        os.fsync = real
    fsync_s.append(spent[0])


def fsync_tree(root: Path) -> None:
    """fsync every file DeepSpeed wrote and their directories: what megadeep does before it commits."""
    from megadeep.checkpoint.store import fsync_dir

    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in {p.parent for p in root.rglob("*")} | {root, root.parent}:
        fsync_dir(d)


def measure_paused(manager, state) -> dict:
    """An async save's own work: snapshot, then the background write/hash/fsync with nothing else running."""
    import time

    settle()
    start = time.perf_counter()
    manager.save(state, background=True)
    manager.wait()
    return {"async_paused_total_s": time.perf_counter() - start, "paused_snapshot_s": manager.timings["snapshot_s"],
            "paused_write_s": manager.timings["write_s"]}


def measure_stall(trainer, manager, step_s: float) -> dict:
    """Time the step that starts a background save and the steps that run while it is written."""
    import time

    from megadeep.checkpoint.manager import TrainState

    start = time.perf_counter()
    trainer.train_step()
    manager.save(TrainState(trainer.step, trainer.train_data.consumed), background=True)
    trigger_s = time.perf_counter() - start
    snapshot_s = manager.timings["snapshot_s"]
    during = []
    while manager.in_flight():
        t0 = time.perf_counter()
        trainer.train_step()
        manager.poll()
        during.append(time.perf_counter() - t0)
    return {"trigger_step_s": trigger_s, "snapshot_s": snapshot_s, "background_write_s": manager.timings["write_s"],
            "steps_during_save_s": during, "async_while_training_s": snapshot_s + manager.timings["write_s"],
            "stall_limit_s": 1.5 * step_s + snapshot_s, "stall_ok": trigger_s <= 1.5 * step_s + snapshot_s}


def headline(r: dict) -> list[dict]:
    safety = {"save": "hashed + fsynced", "load": "hashes verified"}
    return [row(f"checkpoint {what} s, megadeep ({safety[what]}) vs DeepSpeed {what}_checkpoint, "
                f"{r['params'] / 1e6:.0f}M params",
                r[f"megadeep_{what}_s"], r[f"deepspeed_{what}_s"], r[f"{what}_ratio"])
            for what in safety] + [
        row(f"step that starts an async save, s, vs 1.5 x normal step + host snapshot ({r['snapshot_s']:.2f} s), "
            f"{r['params'] / 1e6:.0f}M params", r["trigger_step_s"], r["stall_limit_s"]),
        row(f"checkpoint save s, megadeep (hashed + fsynced) vs DeepSpeed save_checkpoint + fsync of its files, "
            f"{r['params'] / 1e6:.0f}M params", statistics.median(
                r["fsynced_samples_s"]["megadeep"]), r["deepspeed_fsynced_save_s"], r["save_ratio_vs_deepspeed_fsynced"]),
        row(f"async save total, training paused (snapshot + background write/hash/fsync) s vs DeepSpeed "
            f"save_checkpoint, {r['params'] / 1e6:.0f}M params", r["async_paused_total_s"], r["deepspeed_save_s"]),
        row(f"async save wall while training runs on the same 2 cores s vs DeepSpeed save_checkpoint, "
            f"{r['params'] / 1e6:.0f}M params", r["async_while_training_s"], r["deepspeed_save_s"]),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    r = run(args.quick)
    print(f"{r['params'] / 1e6:.0f}M params, train step {r['train_step_s']:.2f} s")
    print(f"{'':10}{'megadeep':>12}{'DeepSpeed':>12}{'ratio':>8}")
    for what in ("save", "load"):
        print(f"{what:10}{r[f'megadeep_{what}_s']:>11.2f}s{r[f'deepspeed_{what}_s']:>11.2f}s{r[f'{what}_ratio']:>8.2f}")
    print(f"{'bytes':10}{r['megadeep_bytes'] / 1e6:>11.0f}M{r['deepspeed_bytes'] / 1e6:>11.0f}M")
    print(f"async: trigger step {r['trigger_step_s']:.2f} s (limit {r['stall_limit_s']:.2f} s = 1.5 x step + "
          f"snapshot {r['snapshot_s']:.2f} s), background write {r['background_write_s']:.2f} s, total "
          f"{r['async_while_training_s']:.2f} s = {r['async_while_training_over_deepspeed']:.2f} x DeepSpeed save; "
          f"training paused {r['async_paused_total_s']:.2f} s = {r['async_paused_over_deepspeed']:.2f} x; steps meanwhile "
          + ", ".join(f"{t:.2f}" for t in r["steps_during_save_s"]))
    print(f"save vs DeepSpeed + fsync: {r['deepspeed_fsynced_save_s']:.2f} s, ratio "
          f"{r['save_ratio_vs_deepspeed_fsynced']:.2f}; megadeep fsync share {r['megadeep_fsync_s']:.2f} s; "
          f"load {r['load_avg']}")
    print(f"wrote {save('checkpoint', {'quick': args.quick, **r})}")
