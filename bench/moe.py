"""Tokens/s of the MoE tiny model (configs/tiny-moe.yaml's shape: 8 experts, top-2) next to a dense model
of the same active parameters (FFN width = top-k × expert width), on 1 and 4 processes, and the expert
all-to-all bytes per step counted by megadeep's comm layer next to the analytic count.

Each process count is one launch that alternates MoE and dense trainers (MoE, dense, MoE, dense, ...;
each a fresh Trainer, the first steps of each discarded as warm-up), so load swings on a shared machine
hit both; the ratio is the median of per-round ratios. Analytic all-to-all bytes per rank and step, for
routing spread evenly: every MoE layer sends each (token, slot) pair whose expert lives on another of the
EP ranks — a fraction (EP-1)/EP — four times (dispatch and combine, forward and backward) as d fp32 values.

    python -m bench.moe [--quick]
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

SHAPE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, experts=8, top_k=2, expert_ffn=192, seq_len=128,
             micro_batch=4, global_batch=16, steps=8, warmup=3, rounds=3)
QUICK = dict(SHAPE, n_layers=2, seq_len=32, steps=4, warmup=2, rounds=1)


def overrides(s: dict, text: str, moe: bool, nproc: int) -> list[str]:
    common = [f"model.dim={s['dim']}", f"model.n_layers={s['n_layers']}", f"model.n_heads={s['n_heads']}",
              f"model.n_kv_heads={s['n_kv_heads']}", f"model.max_seq_len={s['seq_len']}", f"train.seq_len={s['seq_len']}",
              f"train.micro_batch_size={s['micro_batch']}", f"train.global_batch_size={s['global_batch']}",
              f"train.steps={s['steps']}", "optim.warmup_steps=1", "log.progress=false", "deepspeed.config=zero1",
              f"data.paths=[{text}]", "data.val_fraction=0"]
    if not moe:
        return common + [f"model.ffn_dim={s['top_k'] * s['expert_ffn']}"]
    return common + [f"model.moe.num_experts={s['experts']}", f"model.moe.top_k={s['top_k']}",
                     f"model.moe.ffn_dim={s['expert_ffn']}", f"parallel.ep={nproc}"]


def worker(s: dict, text: str, out: str) -> None:
    from megadeep.config import load_config, resolve
    from megadeep.launch.env import discover
    from megadeep.parallel import groups
    from megadeep.training.trainer import Trainer

    nproc = discover().world_size
    rounds = []
    for _ in range(s["rounds"]):
        row = {}
        for kind in ("moe", "dense"):
            trainer = Trainer(resolve(load_config(None, overrides(s, text, kind == "moe", nproc)), nproc))
            steps, a2a = [], []
            for i in range(s["steps"]):
                groups.take_a2a_bytes()
                r = trainer.train_step()
                if i >= s["warmup"]:
                    steps.append(r.tokens_per_s)
                    a2a.append(groups.take_a2a_bytes())
            trainer.close()
            row[kind] = {"tokens_per_s": statistics.median(steps), "a2a_bytes_per_step": statistics.median(a2a)}
        rounds.append(row)
    if discover().rank == 0:
        Path(out).write_text(json.dumps(rounds))


def analytic_a2a_bytes(s: dict, nproc: int) -> float:
    """Per rank and optimizer step, for evenly spread routing (see the module docstring)."""
    tokens_per_rank = s["global_batch"] // nproc * s["seq_len"]  # all its micro-batches
    return 4 * s["n_layers"] * tokens_per_rank * s["top_k"] * (nproc - 1) / nproc * s["dim"] * 4


def run(quick: bool = False, nprocs=(1, 4)) -> dict:
    import random

    from bench.common import launch_workers

    s = QUICK if quick else SHAPE
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_bytes(random.Random(0).randbytes(1 << 20))
        for n in nprocs:
            rounds = launch_workers("bench.moe", n, Path(tmp) / f"r{n}.json", s, threads=max(1, 2 // n), text=text)
            moe_tps = statistics.median(r["moe"]["tokens_per_s"] for r in rounds)
            results[f"nproc={n}"] = {
                "rounds": rounds, "moe_tokens_per_s": moe_tps,
                "dense_tokens_per_s": statistics.median(r["dense"]["tokens_per_s"] for r in rounds),
                "moe_over_dense": statistics.median(r["moe"]["tokens_per_s"] / r["dense"]["tokens_per_s"] for r in rounds),
                "a2a_bytes_per_step": statistics.median(r["moe"]["a2a_bytes_per_step"] for r in rounds),
                "a2a_bytes_analytic": analytic_a2a_bytes(s, n),
            }
    return {"shape": s, "results": results}


def headline(result: dict) -> list[dict]:
    from bench.common import row

    rows = []
    for n, r in result["results"].items():
        rows.append(row(f"MoE tiny tokens/s, {n}, vs dense of the same active params", r["moe_tokens_per_s"],
                        r["dense_tokens_per_s"], r["moe_over_dense"]))
        if r["a2a_bytes_analytic"]:
            rows.append(row(f"expert all-to-all MiB per rank and step, {n}, counted vs analytic (even routing)",
                            r["a2a_bytes_per_step"] / 2**20, r["a2a_bytes_analytic"] / 2**20))
    return rows


def report(r: dict) -> None:
    for n, x in r["results"].items():
        print(f"{n}: MoE {x['moe_tokens_per_s']:.0f} tok/s, dense {x['dense_tokens_per_s']:.0f} tok/s, "
              f"ratio {x['moe_over_dense']:.3f}; all-to-all {x['a2a_bytes_per_step'] / 2**20:.2f} MiB/step "
              f"(analytic {x['a2a_bytes_analytic'] / 2**20:.2f})")


def main() -> None:
    from bench.common import worker_cli

    worker_cli("moe", __doc__, run, worker, report, extra=("text",))


if __name__ == "__main__":
    main()
