"""Context parallelism: activation bytes per rank at seq 8192 as cp grows, and attention communication
bytes per layer against the analytic count.

Activations are what autograd keeps for backward during one forward with the loss (every tensor a
saved-tensor hook sees, each storage once, parameters excluded), per rank, for a 2-layer model
(dim 256, 8 heads, 4 KV heads) on one sequence of 8192 tokens; cp=1, 2, 4 run in one 4-rank launch
(DP fills the rest), Ulysses attention (what ``auto`` picks here). The s×s scores never exist (SDPA's
fused kernel), so the ratio is the share of every other activation a rank keeps.

Communication: the bytes each rank receives in one decoder layer's forward + backward, counted at
``torch.distributed``'s collectives (all-to-all, all-gather, reduce-scatter; DeepSpeed's Ulysses
calls the same functions), for Ulysses and all-gather-KV at seq 1024, next to
``megadeep.model.accounting.cp_attention_bytes`` (×2 for backward).
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

SHAPE = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=512, vocab_size=256, seq=8192, comm_seq=1024)
QUICK = dict(SHAPE, seq=1024, comm_seq=256)
WORLD = 4


def _count_received(counts: Counter):
    """Wrap torch.distributed's collectives to add the bytes this rank receives from the others."""
    import torch.distributed as dist

    def nbytes(t):
        return t.numel() * t.element_size()

    a2a, ag, rs = dist.all_to_all_single, dist.all_gather_single, dist.reduce_scatter_single

    def all_to_all_single(output, input, *args, group=None, **kwargs):
        counts["all_to_all"] += nbytes(output) * (dist.get_world_size(group) - 1) // dist.get_world_size(group)
        return a2a(output, input, *args, group=group, **kwargs)

    def all_gather_single(output, input, *args, **kwargs):
        counts["all_gather"] += nbytes(output) - nbytes(input)
        return ag(output, input, *args, **kwargs)

    def reduce_scatter_single(output, input, *args, **kwargs):
        counts["reduce_scatter"] += nbytes(input) - nbytes(output)
        return rs(output, input, *args, **kwargs)

    dist.all_to_all_single, dist.all_gather_single, dist.reduce_scatter_single = (
        all_to_all_single, all_gather_single, reduce_scatter_single)


def saved_bytes(model, tokens) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward with the loss."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, tokens)
    del loss
    return sum(seen.values())


def worker(shape: dict, out: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from megadeep.config.schema import ModelConfig
    from megadeep.model.accounting import cp_attention_bytes
    from megadeep.model.llama import Block, Transformer, init_weights
    from megadeep.parallel import groups
    from megadeep.parallel.layout import Layout

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = ModelConfig(**{k: shape[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")},
                      max_seq_len=shape["seq"])
    counts: Counter = Counter()
    _count_received(counts)
    memory, comm = {}, {}
    for cp in (1, 2, 4):
        groups.initialize(Layout(cp=cp, dp=WORLD // cp))
        model = Transformer(cfg)
        model.init_weights(0)
        tokens = torch.randint(0, cfg.vocab_size, (1, shape["seq"]))
        memory[f"cp={cp}"] = saved_bytes(model, tokens)
        for method in ("ulysses", "allgather") if cp > 1 else ():
            block = Block(cfg, 0, cp_attention=method)
            init_weights(block, "layers.0", 0)
            s = shape["comm_seq"]
            x = torch.randn(1, s // cp, cfg.dim, requires_grad=True)
            counts.clear()
            block(x).sum().backward()
            analytic = 2 * cp_attention_bytes(cfg, s, 1, 1, cp, method, 4)
            comm[f"cp={cp},{method}"] = {"measured": dict(counts), "analytic": analytic,
                                         "ratio": sum(counts.values()) / analytic}
        groups.destroy()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"activation_bytes": memory, "comm": comm}))


def run(quick: bool = False) -> dict:
    from bench.common import launch_workers

    shape = QUICK if quick else SHAPE
    with tempfile.TemporaryDirectory() as tmp:
        r = launch_workers("bench.cp_memory", WORLD, Path(tmp) / "r.json", shape)
    base = r["activation_bytes"]["cp=1"]
    r["activation_ratio"] = {k: v / base for k, v in r["activation_bytes"].items()}
    return {"shape": shape, **r}


def headline(result: dict) -> list[dict]:
    from bench.common import row

    base = result["activation_bytes"]["cp=1"]
    rows = [row(f"activation MiB per rank at seq {result['shape']['seq']}, {k} vs cp=1", v / 2**20, base / 2**20)
            for k, v in result["activation_bytes"].items() if k != "cp=1"]
    rows += [row(f"CP attention bytes per layer fwd+bwd, {k}, MiB measured vs analytic",
                 sum(c["measured"].values()) / 2**20, c["analytic"] / 2**20, c["ratio"])
             for k, c in result["comm"].items()]
    return rows


def report(r: dict) -> None:
    print(json.dumps({k: r[k] for k in ("activation_bytes", "activation_ratio", "comm")}, indent=1))


def main() -> None:
    from bench.common import worker_cli

    worker_cli("cp_memory", __doc__, run, worker, report)


if __name__ == "__main__":
    main()
