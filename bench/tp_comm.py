"""Tensor-parallel bytes per decoder layer (forward + backward) as counted by megadeep's comm layer,
next to the analytic minimum of Megatron's scheme, with and without sequence parallel.

Also reports ring wire bytes per rank (all-reduce 2(t-1)/t·n, all-gather / reduce-scatter (t-1)/t·n),
which shows sequence parallel moving the same bytes as plain TP while splitting activations.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

SHAPE = dict(batch=4, seq=256, dim=768, n_heads=12, ffn_dim=2048)
QUICK = dict(batch=2, seq=64, dim=128, n_heads=4, ffn_dim=256)


def wire_bytes(counts: dict[str, int], tp: int) -> float:
    factor = {"all_reduce": 2 * (tp - 1) / tp, "all_gather": (tp - 1) / tp, "reduce_scatter": (tp - 1) / tp}
    return sum(factor[op] * n for op, n in counts.items())


def worker(shape: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from megadeep.config.schema import ModelConfig
    from megadeep.model.llama import Block
    from megadeep.monitoring.comm import min_tp_bytes_per_layer
    from megadeep.parallel import groups
    from megadeep.parallel.layout import Layout

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    groups.initialize(Layout(tp=tp))
    cfg = ModelConfig(dim=shape["dim"], n_heads=shape["n_heads"], ffn_dim=shape["ffn_dim"])
    b, s, h = shape["batch"], shape["seq"], shape["dim"]
    rows = {}
    for sp in (False, True):
        block = Block(cfg, 0, sequence_parallel=sp)
        x = torch.randn(b, s // tp if sp else s, h, requires_grad=True)
        groups.take_tp_bytes()
        block(x).sum().backward()
        counted = groups.take_tp_bytes()
        minimum = min_tp_bytes_per_layer(b, s, h, 4, sp)
        rows[f"sp={sp}"] = {"counted": counted, "minimum": minimum,
                            "ratio": sum(counted.values()) / sum(minimum.values()),
                            "wire_bytes_per_rank": wire_bytes(counted, tp)}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"tp": tp, "rows": rows}))
    groups.destroy()
    dist.destroy_process_group()


def run(quick: bool = False, tp_sizes=(2, 4)) -> dict:
    from bench.common import launch_workers

    shape = QUICK if quick else SHAPE
    results = {}
    for tp in tp_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            results[f"tp={tp}"] = launch_workers("bench.tp_comm", tp, Path(tmp) / "r.json", shape)["rows"]
    return {"shape": shape, "results": results}


def headline(result: dict) -> list[dict]:
    from bench.common import row

    return [row(f"TP bytes per layer fwd+bwd, {tp} {sp}, MiB counted vs analytic minimum",
                sum(r["counted"].values()) / 2**20, sum(r["minimum"].values()) / 2**20, r["ratio"])
            for tp, rows in result["results"].items() for sp, r in rows.items()]


def report(r: dict) -> None:
    for tp, rows in r["results"].items():
        for sp, row in rows.items():
            print(f"{tp} {sp}: counted {sum(row['counted'].values()) / 2**20:.2f} MiB, "
                  f"minimum {sum(row['minimum'].values()) / 2**20:.2f} MiB, ratio {row['ratio']:.3f}, "
                  f"wire/rank {row['wire_bytes_per_rank'] / 2**20:.2f} MiB")


def main() -> None:
    from bench.common import worker_cli

    worker_cli("tp_comm", __doc__, run, worker, report)


if __name__ == "__main__":
    main()
