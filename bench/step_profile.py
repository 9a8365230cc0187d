"""Where megadeep's training step spends its time next to the bare model's fwd+bwd+clip+optimizer step,
both in one process on the same batch, steps alternating (megadeep, bare, megadeep, ...): per-phase
seconds from cProfile (forward, backward, clipping, optimizer, the rest: engine bookkeeping, data, the
loss sync, the LR schedule), the median per-pair step ratio, and torch.profiler's operator table with
the operators megadeep runs that the bare step does not (DeepSpeed's work shows up there).

    python -m bench.step_profile [--quick] [--pairs N]
"""
from __future__ import annotations

import argparse
import cProfile
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

# quick: a smaller shape with the issue shape's proportions of model to step overhead (vocab-heavy, untied)
MEDIUM = dict(vocab_size=8000, dim=256, n_layers=4, n_heads=4, ffn_dim=768, seq_len=128, batch=4)


def _code_key(fn) -> tuple:
    code = inspect.unwrap(fn).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def phase_keys() -> dict[str, list[tuple]]:
    """The functions whose cumulative time is each phase (megadeep's and the bare loop's spelling)."""
    import torch

    from megadeep.model import Transformer
    from megadeep.training.grad_norm import ClipByGlobalNorm

    return {"forward": [_code_key(Transformer.forward)],
            "backward": [_code_key(torch.autograd.backward)],
            "clip": [_code_key(ClipByGlobalNorm.__call__), _code_key(torch.nn.utils.clip_grad_norm_)],
            "optimizer": [_code_key(torch.optim.AdamW.step)]}


def profiled_step(step, keys: dict) -> dict[str, float]:
    import pstats

    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(step)
    total = time.perf_counter() - start
    stats = pstats.Stats(prof).stats
    phases = {name: sum(stats[k][3] for k in ks if k in stats) for name, ks in keys.items()}
    phases["other"] = total - sum(phases.values())
    return {"total": total, **phases}


def operator_table(steps: dict, repeats: int = 2) -> dict:
    """Self CPU ms and call counts per operator over ``repeats`` steps of each side."""
    from torch.profiler import ProfilerActivity, profile

    ops = {}
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(repeats):
                step()
        ops[name] = {e.key: {"count": e.count // repeats, "self_ms": e.self_cpu_time_total / 1e3 / repeats}
                     for e in p.key_averages()}
    md, bare = ops["megadeep"], ops["bare"]
    extra = {k: {"megadeep": md.get(k, {}).get("count", 0), "bare": bare.get(k, {}).get("count", 0)}
             for k in set(md) | set(bare) if md.get(k, {}).get("count", 0) != bare.get(k, {}).get("count", 0)}
    top = lambda d: dict(sorted(((k, round(v["self_ms"], 2)) for k, v in d.items()), key=lambda kv: -kv[1])[:15])  # noqa: E731
    return {"top_self_ms": {n: top(d) for n, d in ops.items()},
            "total_self_ms": {n: sum(v["self_ms"] for v in d.values()) for n, d in ops.items()},
            "count_differences_per_step": dict(sorted(extra.items()))}


def run(quick: bool = False, pairs: int | None = None) -> dict:
    import os

    import torch

    from bench.train_throughput import SHAPE, WARMUP_STEPS, build_megadeep, build_megadeep_bare

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    s = MEDIUM if quick else SHAPE
    pairs = pairs or (8 if quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        steps = {"megadeep": build_megadeep(s, Path(tmp))[0], "bare": build_megadeep_bare(s, Path(tmp))[0]}
        for _ in range(WARMUP_STEPS):
            for step in steps.values():
                step()
        keys = phase_keys()
        samples = {n: [] for n in steps}
        for i in range(pairs):
            order = list(steps) if i % 2 == 0 else list(steps)[::-1]
            for name in order:
                samples[name].append({**profiled_step(steps[name], keys), "load": os.getloadavg()[0]})
        ops = operator_table(steps)
    ratio = statistics.median(b["total"] / m["total"] for m, b in zip(samples["megadeep"], samples["bare"]))
    med = {n: {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "load"} for n, rows in samples.items()}
    return {"shape": s, "quick": quick, "pairs": pairs, "warmup_steps": WARMUP_STEPS,
            "bare_over_megadeep_step": ratio, "median_phase_s": med, "operators": ops, "samples": samples}


def headline(r: dict) -> list[dict]:
    from bench.common import row

    m, b = r["median_phase_s"]["megadeep"], r["median_phase_s"]["bare"]
    return [row("training step s, megadeep Trainer vs bare model fwd+bwd+clip+AdamW (same process, "
                "alternating; ratio = median per-pair bare/megadeep)", m["total"], b["total"], r["bare_over_megadeep_step"])]


def main() -> None:
    import json

    from bench.common import save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int)
    args = ap.parse_args()
    r = run(args.quick, args.pairs)
    loads = [x["load"] for rows in r["samples"].values() for x in rows]
    print(f"{r['pairs']} pairs, load average {min(loads):.1f}-{max(loads):.1f}; "
          f"bare/megadeep step (median per pair) {r['bare_over_megadeep_step']:.3f}")
    for name, ph in r["median_phase_s"].items():
        print(f"{name:>9}: " + "  ".join(f"{k} {v:.3f}s" for k, v in ph.items()))
    print("operator calls per step that differ:", json.dumps(r["operators"]["count_differences_per_step"]))
    print("saved", save("step_profile" + ("-quick" if args.quick else ""), r))


if __name__ == "__main__":
    sys.exit(main())
