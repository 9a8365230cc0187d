"""Enumerate the layouts a cluster allows, keep the legal ones that fit, rank them by step time.

Legality is megadeep's own: each candidate becomes a run config and goes through
``megadeep.config.resolve`` (heads and FFN divisible by TP, ZeRO 2/3 refused with PP, batch
arithmetic, ...), plus the planner's rule that a TP group stays inside one node.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from megadeep.config import RunConfig, resolve
from megadeep.config.schema import ModelConfig
from megadeep.errors import ConfigError
from megadeep.planner.estimate import Candidate, Estimate, Workload, estimate
from megadeep.planner.hardware import Cluster

RECIPES = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero3_offload_all")
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)

# Llama-style sizes (vocabularies padded as trained); gpt3-175B is GPT-3's shape with a gated MLP of
# width 8h/3, which has GPT's 12h² parameters and FLOPs per layer.
PRESETS = {
    "125M": ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=4096,
                        tie_embeddings=False),
    "1B": ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                      max_seq_len=4096, tie_embeddings=False),
    "7B": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=4096,
                      tie_embeddings=False),
    "13B": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, ffn_dim=13824, max_seq_len=4096,
                       tie_embeddings=False),
    "70B": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                       max_seq_len=4096, tie_embeddings=False),
    "gpt3-175B": ModelConfig(vocab_size=51200, dim=12288, n_layers=96, n_heads=96, ffn_dim=32768,
                             max_seq_len=2048, tie_embeddings=True),
}


def run_config(base: RunConfig, w: Workload, c: Candidate, nvme_path: str = "") -> RunConfig:
    """The run config that trains ``w`` with layout ``c`` (DP and accumulation left to derive)."""
    cfg = copy.deepcopy(base)
    cfg.model = copy.deepcopy(w.model)
    cfg.model.activation_checkpointing = c.recompute == "full"
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.cp, cfg.parallel.ep = c.tp, c.pp, 0, c.cp, c.ep
    cfg.parallel.sequence_parallel = c.sequence_parallel
    cfg.train.seq_len, cfg.train.precision = w.seq, w.precision
    cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.grad_accum_steps = c.micro_batch, w.global_batch, 0
    cfg.deepspeed.config = c.recipe
    if nvme_path:
        cfg.deepspeed.nvme_path = nvme_path
    return cfg


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(w: Workload, cluster: Cluster, recipes=RECIPES, cp_sizes=(1,)):
    """``cp_sizes``: context-parallel sizes to consider (``megadeep plan --cp``; CP is for sequences
    whose activations do not fit otherwise, so the default plans without it)."""
    world = cluster.world_size
    for tp in (d for d in divisors(world) if d <= cluster.gpus_per_node):
        for cp in (c for c in cp_sizes if (world // tp) % c == 0 and (c == 1 or w.seq % (2 * c) == 0)):
            for pp in (d for d in divisors(world // (tp * cp)) if d <= w.model.n_layers):
                dp = world // (tp * cp * pp)
                if w.global_batch % dp:
                    continue
                for b in (b for b in MICRO_BATCHES if (w.global_batch // dp) % b == 0):
                    for recipe in recipes:
                        for recompute in ("selective", "full"):
                            yield Candidate(tp, pp, dp, recipe, b, recompute,
                                            tp > 1 and (w.seq // cp) % tp == 0, cp=cp,
                                            ep=math.gcd(dp, w.model.moe.num_experts) if w.model.moe.enabled else 1)


@dataclass
class Plan:
    ranked: list[Estimate] = field(default_factory=list)
    illegal: dict[str, int] = field(default_factory=dict)  # first line of each ConfigError -> count
    too_big: int = 0


def plan(w: Workload, cluster: Cluster, base: RunConfig, recipes=RECIPES, nvme_path: str = "", compute=None,
         cp_sizes=(1,)) -> Plan:
    """Every legal candidate that fits, fastest first; ``compute``: a Calibration instead of the tables."""
    out = Plan()
    legal: dict[tuple, bool] = {}
    for c in candidates(w, cluster, recipes, cp_sizes):
        key = (c.tp, c.pp, c.micro_batch, c.recipe, c.cp)
        if key not in legal:
            try:
                resolve(run_config(base, w, c, nvme_path), cluster.world_size, require_data=False)
                legal[key] = True
            except ConfigError as e:
                legal[key] = False
                reason = str(e).split(";")[0]
                out.illegal[reason] = out.illegal.get(reason, 0) + 1
        if not legal[key]:
            continue
        e = estimate(w, c, cluster, compute)
        if e.memory > cluster.gpu.memory or e.host * cluster.gpus_per_node > cluster.host_memory:
            out.too_big += 1
            continue
        out.ranked.append(e)
    out.ranked.sort(key=lambda e: (e.step_s, e.memory))
    return out
