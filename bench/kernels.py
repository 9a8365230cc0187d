"""CPU fp32 forward+backward of RMSNorm and SwiGLU: megadeep's fused kernels vs eager PyTorch vs
torch.compile of the same eager code, with the machine's copy bandwidth measured in the same run.

Each step is forward + backward through autograd, allocations included, as training runs them.
"Bytes" is what the op must move at the least, counted once per tensor read or written:
RMSNorm reads x and writes y, then reads x and dy and writes dx (5·T·H elements; the weight and row
statistics are negligible); SwiGLU with gate and up of width H reads both and writes out, then reads
both and dout and writes d(gate | up) (8·T·H elements). Copy bandwidth counts a copy_ the same way
(read + write). Implementations are timed interleaved, repeated; times are medians and speedups the
median of per-repeat ratios. SwiGLU runs twice fused: out of place, and with the gradient written
over gate_up as the model's FFN does (same bytes moved, no fresh d(gate | up) tensor to page in).

    python -m bench.kernels [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from megadeep import ops
from megadeep.ops import fused

EPS = 1e-5
SIZES = [(4096, 1024), (4096, 4096), (16384, 1024), (16384, 4096)]
QUICK_SIZES = [(4096, 1024)]


def copy_bandwidth(repeats: int, n_bytes: int = 1 << 28) -> float:
    """Median bytes/s of a large tensor copy_ (read + write), this process's threads."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times)


def fresh_write_bandwidth(repeats: int, n_bytes: int = 1 << 28) -> float:
    """Median bytes/s of writing a freshly allocated tensor: what an op pays per output byte, page
    faults included (copy bandwidth writes into memory that is already mapped)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.empty(n_bytes // 4).fill_(1.0)
        times.append(time.perf_counter() - t0)
    return n_bytes / statistics.median(times)


def rms_norm_case(tokens: int, hidden: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(hidden, generator=g)
    dy = torch.randn(tokens, hidden, generator=g)
    return (x, w), dy, 5 * tokens * hidden * 4


def swiglu_case(tokens: int, hidden: int):
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(tokens, 2 * hidden, generator=g)
    dout = torch.randn(tokens, hidden, generator=g)
    return (gate_up,), dout, 8 * tokens * hidden * 4


def eager_rms_norm(x, w):
    return ops.rms_norm(x, w, EPS)


def fused_rms_norm(x, w):
    return ops.rms_norm(x, w, EPS, fused=True)


def fused_swiglu(gate_up):
    return ops.swiglu(gate_up, fused=True)


def fused_swiglu_grad_in_place(gate_up):
    """As the model calls it: gate_up is an intermediate (here a view of the input, free to make)."""
    return ops.swiglu(gate_up.view(gate_up.shape), fused=True, grad_in_place=True)


OPS = {
    "rms_norm": (rms_norm_case, {"fused": fused_rms_norm, "eager": eager_rms_norm}),
    "swiglu": (swiglu_case, {"fused": fused_swiglu, "fused_in_place": fused_swiglu_grad_in_place,
                             "eager": ops.swiglu}),
}


def step(fn, leaves, pristine, dout) -> float:
    """Seconds for one forward + backward. Untimed first: gradients are freed (as after an optimizer
    step) and the inputs restored (grad_in_place overwrites them)."""
    with torch.no_grad():
        for t, p in zip(leaves, pristine):
            t.grad = None
            t.copy_(p)
    t0 = time.perf_counter()
    fn(*leaves).backward(dout)
    return time.perf_counter() - t0


def check_same_result(impls: dict, inputs, dout) -> None:
    """All implementations compute the same output and gradients (so the timings compare like with like)."""
    results = {}
    for name, fn in impls.items():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(dout)
        results[name] = [out.detach(), *(t.grad for t in leaves)]
    ref = results["eager"]
    for name, tensors in results.items():
        for got, want in zip(tensors, ref):
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 1e-4, f"{name} disagrees with eager: relative error {err:.2e}"


def run(quick: bool = False) -> dict:
    ok, why = fused.load()
    if not ok:
        raise SystemExit(f"megadeep's kernels are not built: {why}")
    repeats = 3 if quick else 7
    load_before = os.getloadavg()
    bandwidth = [copy_bandwidth(repeats)]
    fresh = [fresh_write_bandwidth(repeats)]
    rows = []
    for op, (make, base) in OPS.items():
        impls = dict(base)
        impls["compile"] = torch.compile(base["eager"], dynamic=False)
        for tokens, hidden in QUICK_SIZES if quick else SIZES:
            inputs, dout, n_bytes = make(tokens, hidden)
            check_same_result(impls, inputs, dout)  # also compiles and warms up every implementation
            leaves = [t.clone().requires_grad_() for t in inputs]
            times = {name: [] for name in impls}
            for _ in range(repeats):
                for name, fn in impls.items():
                    times[name].append(step(fn, leaves, inputs, dout))
            med = {name: statistics.median(t) for name, t in times.items()}
            rows.append({
                "op": op, "tokens": tokens, "hidden": hidden, "bytes": n_bytes,
                "ms": {name: 1e3 * t for name, t in med.items()},
                "ms_all": {name: [1e3 * x for x in t] for name, t in times.items()},
                # Median of per-repeat ratios: each repeat times all implementations back to back, so a
                # ratio within one repeat sees the same background load.
                "speedup_vs_eager": {name: statistics.median(e / f for e, f in zip(times["eager"], times[name]))
                                     for name in impls if name.startswith("fused")},
                "speedup_vs_compile": {name: statistics.median(c / f for c, f in zip(times["compile"], times[name]))
                                       for name in impls if name.startswith("fused")},
                "GBps": {name: n_bytes / t / 1e9 for name, t in med.items()},
            })
            del inputs, leaves, dout
        bandwidth.append(copy_bandwidth(repeats))
        fresh.append(fresh_write_bandwidth(repeats))
    copy_bps = statistics.median(bandwidth)
    for r in rows:
        r["pct_of_copy"] = {name: 100 * gbps * 1e9 / copy_bps for name, gbps in r["GBps"].items()}
    return {
        "benchmark": "kernels",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "dtype": "float32", "repeats": repeats,
        "copy_GBps": copy_bps / 1e9, "copy_GBps_samples": [b / 1e9 for b in bandwidth],
        "fresh_write_GBps": statistics.median(fresh) / 1e9, "fresh_write_GBps_samples": [b / 1e9 for b in fresh],
        "rows": rows,
    }


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"copy bandwidth {result['copy_GBps']:.1f} GB/s (read+write), writing fresh pages "
        f"{result['fresh_write_GBps']:.1f} GB/s, {m['threads']} threads, "
        f"load average {m['loadavg_before'][0]:.1f} → {m['loadavg_after'][0]:.1f}",
        f"{'op':9} {'tokens':>6} {'hidden':>6} {'kernel':15} | {'ms':>7} {'eager ms':>8} {'compile ms':>10} | "
        f"{'×eager':>6} {'×compile':>8} | {'%copy':>5} {'eager %':>7} {'compile %':>9}",
    ]
    for r in result["rows"]:
        ms, pct = r["ms"], r["pct_of_copy"]
        for name in r["speedup_vs_eager"]:
            lines.append(
                f"{r['op']:9} {r['tokens']:>6} {r['hidden']:>6} {name:15} | {ms[name]:7.1f} {ms['eager']:8.1f} "
                f"{ms['compile']:10.1f} | {r['speedup_vs_eager'][name]:6.2f} {r['speedup_vs_compile'][name]:8.2f} | "
                f"{pct[name]:4.0f}% {pct['eager']:6.0f}% {pct['compile']:8.0f}%"
            )
    return "\n".join(lines)


def headline(result: dict) -> list[dict]:
    """The largest size of each op, with the fused variant the model calls (SwiGLU: gradient in place)."""
    from bench.common import row

    rows = []
    for op, impl in (("rms_norm", "fused"), ("swiglu", "fused_in_place")):
        r = [r for r in result["rows"] if r["op"] == op][-1]
        for base in ("eager", "compile"):
            rows.append(row(f"{op} fwd+bwd ms, {r['tokens']}×{r['hidden']} fp32, {impl} vs {base} (ratio: speedup)",
                            r["ms"][impl], r["ms"][base], r[f"speedup_vs_{base}"][impl]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size, three repeats")
    args = parser.parse_args()
    result = run(quick=args.quick)
    print(table(result))
    out = Path(__file__).parent / "results" / f"kernels-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
