"""Model construction per rank: memory and time to build a ~1.5B-parameter Llama sharded (TP=2, DP=2,
ZeRO-3, 4 CPU processes) against TP=1 (DP=2, ZeRO-3, 2 processes).

Each rank reports the seconds ``build_model`` takes (wall and the process's CPU seconds: on a machine
with fewer cores than ranks, CPU seconds are the work one rank does, wall seconds include waiting for
a core), and its peak RSS from just before the trainer starts until after the first optimizer step,
above the RSS it had then (the process baseline: interpreter, torch, DeepSpeed), next to its parameter
+ optimizer partition as the planner counts them. Ratios: peak / (params + optimizer partition), and
TP=2 / TP=1 construction CPU seconds.

    python -m bench.construction [--quick] [--scale F]

``--quick`` builds a quarter-width (~100M-parameter) model of the same depth; ``--scale`` shrinks the
width of the full one (for a machine without 4 × 8 GB to spare).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ~1.5B parameters: 30 layers of dim 2048 (GQA 16/4 heads, FFN 5632) and an untied 32000 vocabulary
FULL = dict(dim=2048, n_layers=30, n_heads=16, n_kv_heads=4, ffn_dim=5632, vocab_size=32000)
LAYOUTS = {"tp1": (1, 2), "tp2": (2, 4)}  # name: (TP, processes); DP=2 in both


def shape(quick: bool, scale: float) -> dict:
    s = 0.25 if quick else scale
    unit = 64 * 4  # head_dim 64·k, divisible by TP and the kv heads
    dim = max(unit, int(FULL["dim"] * s) // unit * unit)
    return dict(FULL, dim=dim, n_heads=dim // 128, n_kv_heads=max(2, dim // 512),
                ffn_dim=int(FULL["ffn_dim"] * dim / FULL["dim"]) // 64 * 64)


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def worker(out: str, tp: int, model: dict, text: str) -> None:
    import torch.distributed as dist

    from megadeep.config import load_config, resolve
    from megadeep.training import trainer as trainer_mod
    from megadeep.training.memory_cli import expected_states

    world = int(os.environ["WORLD_SIZE"])
    cfg = resolve(load_config(None, [
        *(f"model.{k}={v}" for k, v in model.items()), "model.tie_embeddings=false", "model.max_seq_len=64",
        f"parallel.tp={tp}", "deepspeed.config=zero3", "train.seq_len=64", "train.micro_batch_size=1",
        f"train.global_batch_size={world // tp}", "train.steps=1", "optim.warmup_steps=0", "data.val_fraction=0",
        f"data.paths=[{text}]", "log.progress=false"]), world)
    timing = {}
    build = trainer_mod.build_model

    def timed(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        model = build(*args, **kwargs)
        timing.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu,
                      build_peak_above_baseline=_status("VmHWM") - baseline)
        return model

    trainer_mod.build_model = timed
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS counts from here
    trainer = trainer_mod.Trainer(cfg)
    init_peak = _status("VmHWM") - baseline  # model built and DeepSpeed's engine and optimizer set up
    trainer.train_step()
    peak = _status("VmHWM")
    states = expected_states(trainer.run_facts, 0)
    row = {"rank": dist.get_rank(), **timing, "baseline": baseline, "peak_above_baseline": peak - baseline,
           "init_peak_above_baseline": init_peak,
           "params_partition": states.params, "grads_partition": states.grads, "optimizer_partition": states.optimizer,
           "largest_param_numel": max(p.numel() for p in trainer.engine.module.parameters())}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    trainer.close()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))


def run(quick: bool = False, scale: float = 1.0) -> dict:
    from megadeep.config.schema import ModelConfig
    from megadeep.model import num_params

    model = shape(quick, scale)
    result = {"model": model, "params": num_params(ModelConfig(**model, tie_embeddings=False)), "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="bench-construct-") as tmp:
        text = Path(tmp) / "text.txt"
        text.write_bytes(bytes(range(256)) * 64)
        for name, (tp, nproc) in LAYOUTS.items():
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                   "bench.construction", "--worker", str(out), "--tp", str(tp), "--model", json.dumps(model),
                   "--text", str(text)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise RuntimeError(f"construction worker ({name}) failed:\n{proc.stderr[-4000:]}")
            rows = json.loads(out.read_text())
            for r in rows:
                r["memory_ratio"] = r["peak_above_baseline"] / (r["params_partition"] + r["optimizer_partition"])
            result["layouts"][name] = rows
    cpu = {n: max(r["cpu_s"] for r in rows) for n, rows in result["layouts"].items()}
    result["construction_cpu_ratio_tp2_vs_tp1"] = cpu["tp2"] / cpu["tp1"]
    result["worst_memory_ratio_tp2"] = max(r["memory_ratio"] for r in result["layouts"]["tp2"])
    return result


def headline(result: dict) -> list[dict]:
    from bench.common import row

    cpu = {n: max(r["cpu_s"] for r in rows) for n, rows in result["layouts"].items()}
    worst = max(result["layouts"]["tp2"], key=lambda r: r["memory_ratio"])
    return [
        row(f"construction CPU s per rank, {result['params'] / 1e9:.2f}B params, TP=2 vs TP=1 (DP=2, ZeRO-3)",
            cpu["tp2"], cpu["tp1"]),
        row("peak RSS above baseline per rank (construction + step 1), GB, vs params+optimizer partition (TP=2 DP=2 ZeRO-3)",
            worst["peak_above_baseline"] / 1e9, (worst["params_partition"] + worst["optimizer_partition"]) / 1e9),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--worker")
    ap.add_argument("--tp", type=int)
    ap.add_argument("--model")
    ap.add_argument("--text")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.tp, json.loads(args.model), args.text)
        return
    from bench.common import save

    result = run(args.quick, args.scale)
    print(json.dumps({k: v for k, v in result.items() if k != "layouts"}, indent=1))
    for name, rows in result["layouts"].items():
        for r in rows:
            print(f"{name} rank {r['rank']}: build {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU; peak above "
                  f"baseline {r['build_peak_above_baseline'] / 1e9:.2f} GB after build, "
                  f"{r['init_peak_above_baseline'] / 1e9:.2f} GB after DeepSpeed's setup, "
                  f"{r['peak_above_baseline'] / 1e9:.2f} GB after step 1 vs partitions "
                  f"{(r['params_partition'] + r['optimizer_partition']) / 1e9:.2f} GB (ratio {r['memory_ratio']:.2f})")
    print(f"saved {save('construction' + ('-quick' if args.quick else ''), result)}")


if __name__ == "__main__":
    main()
