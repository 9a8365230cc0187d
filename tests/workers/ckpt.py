"""Checkpoint scenarios, several per launch: each job is a training run, optionally with a test hook.

argv: JOBS.json OUT.json. JOBS is a list of {"name", "overrides": [...], and optionally
"kill_at_step": k (all ranks first wait for an in-flight background save, then rank 0 SIGKILLs
itself in the forward of step k: a crash mid-step after a completed save),
"kill_in_save_at_step": k (rank 0's background writer SIGKILLs its process half-way through the
first file of step k's checkpoint: a crash while a save is in flight),
"usr1_at_step": k (rank 0 sends itself SIGUSR1 in the forward of step k) with "slow_save_at_step": k2
(every write of step k2's checkpoint first sleeps 1 s, so that save is still in flight),
"nan_at_step": k / "nan_rank": r / "nan_until_step": k2 (rank r's loss is NaN in steps k..k2),
"snapshot_step": k (compare full weights + Adam state before and after step k)}.
OUT gets, per job name, the per-step history, or the error that stopped it.
"""
import json
import os
import signal
import sys
import threading
import time

import torch

from megadeep.checkpoint import store
from megadeep.checkpoint.engine_state import EngineState
from megadeep.checkpoint.tensors import KINDS
from megadeep.config import load_config, resolve
from megadeep.errors import CheckpointError, RunAborted
from megadeep.launch.env import discover
from megadeep.training.trainer import Trainer

TINY = [
    "model.vocab_size=256", "model.dim=64", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4",
    "model.ffn_dim=128", "model.max_seq_len=32", "train.seq_len=32", "train.micro_batch_size=2",
    "train.global_batch_size=8", "optim.lr=0.003", "optim.min_lr=0.0003", "optim.warmup_steps=3",
    "log.progress=false",
]


def full_state(trainer) -> dict:
    """Every parameter's master weight and Adam moments (gathered over DP) and Adam's step."""
    es = EngineState(trainer.engine)
    es.ensure_state()
    out = {f"{kind}:{n}": es.get(p, kind) for n, p in trainer.engine.module.named_parameters() for kind in KINDS}
    out["adam_step"] = torch.tensor(es.adam_step())
    out["lr"] = torch.tensor(trainer.engine.get_lr()[0])
    return out


def install_hooks(trainer, job, rank, report):
    module = trainer.engine.module
    forward = module.forward

    def hooked(*args, **kwargs):
        step = trainer.step + 1  # the step being computed
        if job.get("kill_at_step") == step and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        out = forward(*args, **kwargs)
        first, last = job.get("nan_at_step"), job.get("nan_until_step", job.get("nan_at_step"))
        if first and first <= step <= last and rank == job.get("nan_rank", 0):
            out = out * float("nan")
        return out

    module.forward = hooked
    if job.get("usr1_at_step"):
        def signal_hook(*args, **kwargs):
            if trainer.step + 1 == job["usr1_at_step"] and rank == 0 and "in_flight_at_signal" not in report:
                report["in_flight_at_signal"] = trainer.checkpoints.in_flight()
                os.kill(os.getpid(), signal.SIGUSR1)
            return hooked(*args, **kwargs)

        module.forward = signal_hook
    if job.get("kill_at_step"):
        step_fn = trainer.train_step

        def after_saves_step(*args, **kwargs):
            if trainer.step + 1 == job["kill_at_step"]:
                trainer.checkpoints.wait()  # collective: every rank is here
            return step_fn(*args, **kwargs)

        trainer.train_step = after_saves_step
    write_bytes, commit = store.write_bytes, store.commit
    in_save = lambda root, step: step is not None and root.name == f"{store.TMP_PREFIX}{store.tag(step)}"  # noqa: E731

    def hooked_write(root, rel, data):
        if threading.current_thread() is not threading.main_thread():
            if in_save(root, job.get("kill_in_save_at_step")) and rank == 0:
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                blob = data if isinstance(data, bytes) else b"".join(data)  # write_tensors passes buffers
                path.write_bytes(blob[: len(blob) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            if in_save(root, job.get("slow_save_at_step")):
                time.sleep(1.0)
        return write_bytes(root, rel, data)

    def hooked_commit(tmp, files, step):
        report.setdefault("commits", []).append(step)
        return commit(tmp, files, step)

    store.write_bytes, store.commit = hooked_write, hooked_commit
    if "snapshot_step" in job:
        train_step = trainer.train_step

        def snapshot_step():
            if trainer.step + 1 != job["snapshot_step"]:
                return train_step()
            before = full_state(trainer)
            result = train_step()
            after = full_state(trainer)
            report["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
            report["changed_keys"] = [k for k in before if not torch.equal(before[k], after[k])][:5]
            return result

        trainer.train_step = snapshot_step


def run_job(job, world, text):
    cfg = resolve(load_config(None, TINY + [f"data.paths=[{text}]"] + job["overrides"]), world)
    report = {}
    try:
        trainer = Trainer(cfg)
    except CheckpointError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    originals = store.write_bytes, store.commit
    try:
        install_hooks(trainer, job, discover().rank, report)
        start = trainer.step
        summary = trainer.run()
    except (RunAborted, CheckpointError) as e:
        report["error"] = f"{type(e).__name__}: {e}"
        return report
    finally:
        trainer.close()
        store.write_bytes, store.commit = originals
    h = summary.history
    report.update(start=start, steps=[r.step for r in h], loss=[r.loss for r in h],
                  preempted=summary.preempted, grad_norm=[r.grad_norm for r in h], skipped=[r.skipped for r in h], skipped_total=trainer.engine.skipped_steps)
    return report


def main():
    jobs_path, out_path, text = sys.argv[1:]
    with open(jobs_path) as f:
        jobs = json.load(f)
    world = discover().world_size
    results = {}
    for job in jobs:
        results[job["name"]] = run_job(job, world, text)
        if discover().rank == 0:  # written after every job: a later job may kill the launch on purpose
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
