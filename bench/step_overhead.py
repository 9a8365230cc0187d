"""What each piece of step overhead costs, before and after issue 21's changes, on the throughput
benchmark's ~60M shape (fp32, CPU): the Adam step (torch foreach vs fused), the global gradient norm
(fp64 copy of every gradient vs fused per-tensor norms), DeepSpeed's DP=1 gradient all-reduce path
(flatten, reduce, copy back; now skipped) and RoPE tables (rebuilt per layer vs cached), next to one
forward+backward of the bare model for scale. Old and new alternate in every repeat; medians.

    python -m bench.step_overhead [--quick]
"""
from __future__ import annotations

import statistics
import sys
import time


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(quick: bool = False, repeats: int | None = None) -> dict:
    import torch

    from bench.train_throughput import QUICK, SHAPE, batch, megadeep_model_config
    from megadeep.model import Transformer
    from megadeep.model.llama import cached_rope_tables, rope_tables
    from megadeep.training.grad_norm import sum_of_squares

    s = QUICK if quick else SHAPE
    repeats = repeats or (3 if quick else 7)
    cfg = megadeep_model_config(s)
    model = Transformer(cfg)
    model.init_weights(0)
    inputs, targets = batch(s)
    params = list(model.parameters())

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(inputs, targets).backward()

    fwd_bwd()
    grads = [p.grad for p in params]
    kw = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    adam = {name: torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], **kw, **flag)
            for name, flag in (("foreach", {"foreach": True}), ("fused", {"fused": True}))}
    for opt in adam.values():
        for p, g in zip((q for group in opt.param_groups for q in group["params"]), grads):
            p.grad = g
        opt.step()  # state allocated

    def allreduce_path():  # what DeepSpeed's buffered_allreduce_fallback does to every gradient at DP=1
        flat = torch._utils._flatten_dense_tensors(grads)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    hd, layers = cfg.head_dim, cfg.n_layers
    pieces = {
        "adam": (adam["foreach"].step, adam["fused"].step),
        "grad_norm": (lambda: sum(g.double().pow(2).sum() for g in grads), lambda: sum_of_squares(grads)),
        "dp1_allreduce": (allreduce_path, lambda: None),
        "rope": (lambda: [rope_tables(s["seq_len"], hd, cfg.rope_theta, "cpu") for _ in range(layers)],
                 lambda: [cached_rope_tables(s["seq_len"], cfg.max_seq_len, hd, cfg.rope_theta, "cpu", torch.float32)
                          for _ in range(layers)]),
    }
    times = {"fwd_bwd": []} | {f"{k}_{w}": [] for k in pieces for w in ("before", "after")}
    for _ in range(repeats):
        times["fwd_bwd"].append(_timed(fwd_bwd))
        grads = [p.grad for p in params]
        for k, (before, after) in pieces.items():
            times[f"{k}_before"].append(_timed(before))
            times[f"{k}_after"].append(_timed(after))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["fwd_bwd"]
    return {"shape": s, "repeats": repeats, "median_s": med,
            "pct_of_fwd_bwd": {k: 100 * v / base for k, v in med.items() if k != "fwd_bwd"}, "samples_s": times}


def headline(r: dict) -> list[dict]:
    from bench.common import row

    m = r["median_s"]
    return [row(f"{k} s per step, after vs before issue 21 (fwd+bwd {m['fwd_bwd']:.2f} s)", m[f"{k}_after"],
                m[f"{k}_before"], (m[f"{k}_after"] / m[f"{k}_before"]) if m[f"{k}_before"] else None)
            for k in ("adam", "grad_norm", "dp1_allreduce", "rope")]


if __name__ == "__main__":
    import json

    from bench.common import save

    result = run(quick="--quick" in sys.argv)
    print(json.dumps({k: round(v, 4) for k, v in result["median_s"].items()}, indent=1))
    print("% of fwd+bwd:", {k: round(v, 1) for k, v in result["pct_of_fwd_bwd"].items()})
    print("saved", save("step_overhead" + ("-quick" if "--quick" in sys.argv else ""), result))
