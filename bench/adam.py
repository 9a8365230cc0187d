"""Adam step throughput on this CPU: the implementations megadeep can choose between when the
optimizer runs on the host (torch AdamW foreach, the default on CPU devices; torch's fused AdamW;
DeepSpeedCPUAdam, the choice for offloaded optimizers), as ratios to torch foreach in one run.

    python -m bench.adam [--quick]
"""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch


def _params(n: int, pieces: int = 8) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(pieces):
        p = torch.nn.Parameter(torch.randn(n // pieces, generator=gen))
        p.grad = torch.randn(n // pieces, generator=gen) * 1e-3
        out.append(p)
    return out


def _builders():
    kw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def ds_cpu_adam(params):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)

    return {
        "torch AdamW (foreach)": lambda params: torch.optim.AdamW(params, foreach=True, **kw),
        "torch AdamW (fused)": lambda params: torch.optim.AdamW(params, fused=True, **kw),
        "DeepSpeedCPUAdam": ds_cpu_adam,
    }


def run(quick: bool = False) -> dict:
    n = 2_000_000 if quick else 20_000_000
    steps = 3 if quick else 10
    rows = {}
    for name, build in _builders().items():
        params = _params(n)
        opt = build(params)
        opt.step()  # allocate state (and JIT-load DeepSpeed's op)
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        rows[name] = {"params_per_s": n * steps / (time.perf_counter() - start)}
    base = rows["torch AdamW (foreach)"]["params_per_s"]
    for r in rows.values():
        r["vs_foreach"] = r["params_per_s"] / base
    return {"params": n, "steps": steps, "threads": torch.get_num_threads(), "results": rows}


def headline(result: dict) -> list[dict]:
    from bench.common import row

    base = result["results"]["torch AdamW (foreach)"]["params_per_s"] / 1e6
    return [row(f"Adam step, M params/s, {name} vs torch AdamW foreach", r["params_per_s"] / 1e6, base, r["vs_foreach"])
            for name, r in result["results"].items() if name != "torch AdamW (foreach)"]


def main() -> None:
    result = run(quick="--quick" in sys.argv)
    print(f"Adam step, {result['params'] / 1e6:.0f}M fp32 params, {result['threads']} threads")
    for name, r in result["results"].items():
        print(f"  {name:24s} {r['params_per_s'] / 1e6:8.1f} M params/s   ×{r['vs_foreach']:.2f} vs foreach")
    out = Path(__file__).parent / "results" / f"adam-{datetime.date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
