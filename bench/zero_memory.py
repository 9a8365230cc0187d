"""ZeRO memory vs formula: per-rank bytes of parameters, gradients and optimizer states that DeepSpeed
really holds at ZeRO stages 0-3 (fp32, CPU processes), next to the ZeRO paper's 2Ψ/2Ψ/KΨ accounting
as megadeep's planner implements it (``megadeep.planner.memory.model_states``).

Measured exactly as ``megadeep memory`` does (``megadeep.training.memory_cli.measure_run``: every
tensor storage reachable from the model and DeepSpeed's optimizer counted once, in step 2 while
gradients accumulate); one torchrun launch per data-parallel size runs all four stages. The ratio is
measured / formula, per rank; 1.00 means the planner predicts the bytes DeepSpeed allocates. At stage 2
a rank's gradients exceed Ψ/N_d by up to two parameters: DeepSpeed keeps whole the gradients of the
parameters that straddle its partition's boundaries.

    python -m bench.zero_memory [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = (0, 1, 2, 3)
COMPONENTS = ("params", "grads", "optimizer")
# ~30M parameters (tied embedding); every matrix is above ZeRO-3's persistence threshold (1e5).
MODEL = ["model.vocab_size=8192", "model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.ffn_dim=1408"]
# tests/test_ds_configs.py's model: attention (256×256) below the threshold, MLP and embedding above.
QUICK_MODEL = ["model.vocab_size=512", "model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.ffn_dim=768"]


def overrides(quick: bool, dp: int, text: str) -> list[str]:
    # micro 2 × accumulation 2 × DP: memory is measured while gradients accumulate (see measure_point)
    return [*(QUICK_MODEL if quick else MODEL), "model.max_seq_len=32", "train.seq_len=32",
            "train.micro_batch_size=2", f"train.global_batch_size={4 * dp}", "train.steps=2",
            "optim.warmup_steps=1", "train.precision=fp32", "data.val_fraction=0", f"data.paths=[{text}]",
            "log.progress=false"]


def worker(out: str, quick: bool, text: str) -> None:
    import torch.distributed as dist

    from megadeep.config import load_config, resolve
    from megadeep.training.memory_cli import measure_run

    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for stage in STAGES:
        cfg = resolve(load_config(None, [*overrides(quick, world, text), f"deepspeed.config=zero{stage}"]), world)
        results[f"zero{stage}"] = measure_run(cfg)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


def summarize(rows: list[dict]) -> dict:
    """Per component: formula bytes (the same on every rank), measured bytes and measured/formula per
    rank; ``model_states`` is the sum of the three, the planner's prediction."""
    out = {}
    for c in (*COMPONENTS, "model_states"):
        measured = [sum(r[k] for k in COMPONENTS) if c == "model_states" else r[c] for r in rows]
        formula = sum(rows[0]["expected"].values()) if c == "model_states" else rows[0]["expected"][c]
        out[c] = {"formula": formula, "measured": measured, "ratio": [m / formula for m in measured]}
    out["buffers"] = [r["buffers"] for r in rows]  # residual states: buckets, staging buffers
    return out


def run(quick: bool = False, dp_sizes: tuple[int, ...] | None = None) -> dict:
    dp_sizes = dp_sizes or ((2,) if quick else (2, 4))
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-zero-") as tmp:
        text = Path(tmp) / "text.txt"
        text.write_bytes(bytes(range(256)) * 256)
        for dp in dp_sizes:
            out = Path(tmp) / f"dp{dp}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dp}", "-m",
                   "bench.zero_memory", "--worker", str(out), "--text", str(text), *(["--quick"] if quick else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise RuntimeError(f"zero_memory worker (DP={dp}) failed:\n{proc.stderr[-4000:]}")
            results[f"dp={dp}"] = {stage: {"adam": rows[0]["adam"], "ranks": rows, **summarize(rows)}
                                   for stage, rows in json.loads(out.read_text()).items()}
    return {"model": QUICK_MODEL if quick else MODEL, "precision": "fp32", "results": results}


def headline(result: dict) -> list[dict]:
    from bench.common import row

    dp, stages = list(result["results"].items())[-1]  # the largest DP size run
    mib = 1024**2
    rows = []
    for stage, s in stages.items():
        worst = max(range(len(s["ranks"])), key=lambda i: abs(s["model_states"]["ratio"][i] - 1))
        parts = "/".join(f"{s[c]['ratio'][worst]:.2f}" for c in COMPONENTS)
        rows.append(row(f"ZeRO-{stage[-1]} {dp} model states, MiB per rank vs formula "
                        f"(params/grads/optim ratio {parts})",
                        s["model_states"]["measured"][worst] / mib, s["model_states"]["formula"] / mib,
                        s["model_states"]["ratio"][worst]))
    return rows


def table(result: dict) -> str:
    mib = 1024**2
    lines = [f"ZeRO model states per rank, measured / formula ({result['precision']}); MiB",
             f"{'':6} {'stage':5} | " + " | ".join(f"{c:>21}" for c in (*COMPONENTS, "model_states"))]
    for dp, stages in result["results"].items():
        for stage, s in stages.items():
            for rank in range(len(s["ranks"])):
                cells = [f"{s[c]['measured'][rank] / mib:7.2f}/{s[c]['formula'] / mib:7.2f} {s[c]['ratio'][rank]:5.3f}"
                         for c in (*COMPONENTS, "model_states")]
                lines.append(f"{dp:6} {stage:5} | " + " | ".join(f"{c:>21}" for c in cells) + f"   rank {rank}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--text", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.quick, args.text)
    from bench.common import save

    r = run(args.quick)
    print(table(r))
    print("saved", save("zero_memory", {"quick": args.quick, **r}))


if __name__ == "__main__":
    main()
