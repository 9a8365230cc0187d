"""The pipeline bubble of DeepSpeed's 1F1B schedule, measured: p=4 stages, m ∈ {4, 8, 16} micro-batches.

Each stage's *busy* time is the time spent inside the schedule's ForwardPass and BackwardPass
instructions (timed by wrapping the engine's instruction table); the schedule's time is the step's
wall time minus the optimizer step. Idle = schedule − busy: waiting for activations and gradients,
and the p2p transfers. Measured bubble = mean idle fraction over stages, next to the 1F1B theory
(p−1)/(m+p−1), which assumes equal stages and free communication.

On a machine with fewer cores than stages, stages that compute at the same time share cores:
busy time is inflated in the steady phase (where all stages compute) but not in the ramps, so the
measured bubble comes out *smaller* than on dedicated cores. ``core share`` (CPU time / wall time
inside the compute instructions) shows how much of a core a stage had while computing; 1.0 means
the measurement is clean.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = 4
MICRO_BATCHES = (4, 8, 16)
# Two blocks per stage (type:Block partitioning); the byte vocabulary keeps embedding and head small.
MODEL = ["model.vocab_size=256", "model.dim=256", "model.n_layers=8", "model.n_heads=4", "model.ffn_dim=704",
         "model.max_seq_len=128", "train.seq_len=128", "train.micro_batch_size=2"]
QUICK_MODEL = ["model.vocab_size=256", "model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=128",
               "model.max_seq_len=32", "train.seq_len=32", "train.micro_batch_size=2"]


def theory(m: int, p: int = STAGES) -> float:
    return (p - 1) / (m + p - 1)


def instrument(engine) -> dict[str, float]:
    """Accumulate wall and CPU seconds spent in the engine's compute and optimizer instructions."""
    from deepspeed.runtime.pipe import schedule

    totals = {"compute_wall": 0.0, "compute_cpu": 0.0, "step_wall": 0.0}
    table = dict(type(engine)._INSTRUCTION_MAP)

    def timed(fn, wall_key, cpu_key=None):
        def run(self, *args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            fn(self, *args, **kwargs)
            totals[wall_key] += time.perf_counter() - wall
            if cpu_key:
                totals[cpu_key] += time.process_time() - cpu
        return run

    for instruction in (schedule.ForwardPass, schedule.BackwardPass):
        table[instruction] = timed(table[instruction], "compute_wall", "compute_cpu")
    table[schedule.OptimizerStep] = timed(table[schedule.OptimizerStep], "step_wall")
    engine._INSTRUCTION_MAP = table  # the engine looks instructions up on itself
    return totals


def worker(out: str, quick: bool) -> None:
    import torch.distributed as dist

    from megadeep.config import load_config, resolve
    from megadeep.training.trainer import Trainer

    warmup, steps = (1, 1) if quick else (1, 3)
    rows = []
    for m in MICRO_BATCHES:
        overrides = [*(QUICK_MODEL if quick else MODEL), f"parallel.pp={STAGES}", "parallel.partition_method=type:Block",
                     f"train.global_batch_size={2 * m}", f"train.steps={warmup + steps}", "optim.warmup_steps=1",
                     "deepspeed.config=zero0", "data.corpus=shakespeare", "log.progress=false"]
        trainer = Trainer(resolve(load_config(None, overrides), STAGES))
        for _ in range(warmup):
            trainer.train_step()
        totals = instrument(trainer.engine)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        wall = time.perf_counter() - start
        schedule_s = wall - totals["step_wall"]
        mine = {"stage": trainer.engine.stage_id, "schedule_s": schedule_s / steps,
                "busy_s": totals["compute_wall"] / steps, "busy_cpu_s": totals["compute_cpu"] / steps}
        stages = [None] * STAGES
        dist.all_gather_object(stages, mine)
        stages.sort(key=lambda s: s["stage"])
        for s in stages:
            s["idle_fraction"] = 1 - s["busy_s"] / s["schedule_s"]
            s["core_share"] = s["busy_cpu_s"] / s["busy_s"]
        rows.append({"m": m, "theory": theory(m), "stages": stages,
                     "measured": sum(s["idle_fraction"] for s in stages) / STAGES})
        trainer.close()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // STAGES))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={STAGES}",
               "-m", "bench.pipeline_bubble", "--worker", str(out)] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            raise RuntimeError(f"pipeline_bubble worker failed:\n{proc.stderr[-4000:]}")
        rows = json.loads(out.read_text())
    cores = os.cpu_count() or 1
    return {"stages": STAGES, "model": QUICK_MODEL if quick else MODEL, "cores": cores,
            "oversubscribed": cores < STAGES, "rows": rows}


def table(result: dict) -> str:
    lines = [f"1F1B pipeline bubble, p={result['stages']} stages ({result['cores']} CPU cores)",
             f"{'m':>3} | {'theory':>7} | {'measured':>8} | per stage: idle fraction (core share while computing)"]
    for r in result["rows"]:
        per = "  ".join(f"s{s['stage']} {s['idle_fraction']:.2f} ({s['core_share']:.2f})" for s in r["stages"])
        lines.append(f"{r['m']:>3} | {r['theory']:>7.3f} | {r['measured']:>8.3f} | {per}")
    if result["oversubscribed"]:
        lines.append(f"warning: {result['stages']} stage processes share {result['cores']} cores: stages computing "
                     "together slow each other, which inflates busy time and understates the bubble "
                     "(core share < 1 shows by how much); compare with theory only on ≥ 1 core per stage.")
    return "\n".join(lines)


def headline(result: dict) -> list[dict]:
    from bench.common import row

    note = f", {result['stages']} stages on {result['cores']} cores" if result["oversubscribed"] else ""
    return [row(f"1F1B bubble fraction p={result['stages']} m={r['m']}, measured vs (p-1)/(m+p-1){note}",
                r["measured"], r["theory"]) for r in result["rows"]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.quick)
    else:
        from bench.common import save

        result = run(args.quick)
        print(table(result))
        print(f"wrote {save('pipeline_bubble', result)}")
