"""Planner closed loop: the calibrated planner's predicted step time next to the measured median step
time of real megadeep training runs on this machine (CPU processes, fp32), over shapes and layouts.

Each layout runs under torchrun: the Trainer is built, then every rank times the GEMMs, attention
and memory rate at the run's own shapes (``megadeep.planner.calibrate.measure_kernels``, all ranks at
once so each measures its share of the cores, as in training) and the collectives over the run's
process group (``collective_rates``); then the run trains, and the median of its step times is
compared with ``megadeep.planner.estimate`` fed that calibration (the same path as
``megadeep plan --calibrate``). The ratio is predicted / measured; 1.00 is a perfect prediction.
What the planner does not model shows up in it: Python and DeepSpeed per-step overheads, data loading,
and on a shared machine the load changing between the calibration and the steps (the load average
before and after each layout is recorded with it).

    python -m bench.planner_calibration [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# name, processes, run overrides (fp32, tiny vocabulary: the matmuls of the layers dominate)
LAYOUTS = [
    ("1 process, 384x4", 1, dict(dim=384, layers=4, heads=6, ffn=1024, seq=256, micro=4, batch=8, tp=1, pp=1,
                                 recipe="zero0", sp=False)),
    ("2 processes, DP 2, ZeRO-1, 384x4", 2, dict(dim=384, layers=4, heads=6, ffn=1024, seq=256, micro=4, batch=16,
                                                  tp=1, pp=1, recipe="zero1", sp=False)),
    ("2 processes, TP 2 + SP, 512x3", 2, dict(dim=512, layers=3, heads=8, ffn=1408, seq=256, micro=4, batch=8, tp=2,
                                             pp=1, recipe="zero0", sp=True)),
    ("2 processes, PP 2, 384x4", 2, dict(dim=384, layers=4, heads=6, ffn=1024, seq=256, micro=2, batch=8, tp=1,
                                         pp=2, recipe="zero1", sp=False)),
]


def overrides(s: dict, text: str) -> list[str]:
    return [f"model.vocab_size=512", f"model.dim={s['dim']}", f"model.n_layers={s['layers']}",
            f"model.n_heads={s['heads']}", f"model.ffn_dim={s['ffn']}", f"model.max_seq_len={s['seq']}",
            f"train.seq_len={s['seq']}", f"train.micro_batch_size={s['micro']}", f"train.global_batch_size={s['batch']}",
            f"parallel.tp={s['tp']}", f"parallel.pp={s['pp']}", f"parallel.sequence_parallel={str(s['sp']).lower()}",
            "parallel.partition_method=type:Block",
            f"deepspeed.config={s['recipe']}", "train.precision=fp32", "train.steps=100", "data.val_fraction=0",
            f"data.paths=[{text}]", "log.progress=false", "model.fused_kernels=off"]


def worker(out: str, spec: str, text: str, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from megadeep.config import load_config, resolve
    from megadeep.planner.calibrate import collective_rates, measure_kernels
    from megadeep.planner.estimate import Candidate, Workload, estimate
    from megadeep.training.trainer import Trainer

    s = json.loads(spec)
    world = int(os.environ["WORLD_SIZE"])
    cfg = resolve(load_config(None, overrides(s, text)), world)
    trainer = Trainer(cfg)
    try:
        collectives = collective_rates(torch.device("cpu")) if world > 1 else {}
        cal = measure_kernels(cfg.model, s["seq"], "fp32", [s["tp"]], [s["micro"]])
        cal.collectives, cal.processes = collectives, world
        for _ in range(2):  # warm-up: allocator, DeepSpeed's first-step set-up
            trainer.train_step()
        times = [trainer.train_step().elapsed_s for _ in range(steps)]
        p = cfg.parallel
        w = Workload(cfg.model, s["seq"], s["batch"], "fp32", flash=True, partition_method=p.partition_method)
        c = Candidate(p.tp, p.pp, p.dp, s["recipe"], s["micro"], "full" if cfg.model.activation_checkpointing
                      else "selective", p.sequence_parallel)
        e = estimate(w, c, cal.local_cluster(64 * 1024**3), cal)
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps({
                "measured_s": statistics.median(times), "step_times_s": times, "predicted_s": e.step_s,
                "ratio": e.step_s / statistics.median(times), "breakdown": e.breakdown(),
                "calibration": {"gemm_peak_flops": cal.peak, "memory_bytes_per_s": cal.memory_rate,
                                "collectives": collectives}}))
    finally:
        trainer.close()


def run(quick: bool = False) -> dict:
    steps = 3 if quick else 7
    results = {}
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-planner-") as tmp:
        text = Path(tmp) / "text.txt"
        text.write_bytes(bytes(range(256)) * 2048)
        for name, nproc, spec in LAYOUTS[:3] if quick else LAYOUTS:
            out = Path(tmp) / "out.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                   "bench.planner_calibration", "--worker", str(out), "--spec", json.dumps(spec), "--text", str(text),
                   "--steps", str(steps)]
            threads = str(max(1, (os.cpu_count() or 1) // nproc))
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root,
                                  env={**os.environ, "OMP_NUM_THREADS": threads})
            if proc.returncode != 0:
                raise RuntimeError(f"planner_calibration worker ({name}) failed:\n{proc.stderr[-4000:]}")
            results[name] = {"processes": nproc, "spec": spec, "loadavg_before_after": [load, os.getloadavg()[0]],
                             **json.loads(out.read_text())}
    return {"precision": "fp32", "steps": steps, "results": results}


def headline(result: dict) -> list[dict]:
    from bench.common import row

    return [row(f"{name}: step s, calibrated planner's prediction vs measured median", r["predicted_s"],
                r["measured_s"], r["ratio"]) for name, r in result["results"].items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--spec")
    ap.add_argument("--text")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.spec, args.text, args.steps)
        return
    from bench.common import save

    result = run(args.quick)
    for r in headline(result):
        print(f"{r['what']}: {r['megadeep']:.3f} vs {r['baseline']:.3f} (ratio {r['ratio']:.2f})")
    print(save("planner_calibration", result))


if __name__ == "__main__":
    main()
