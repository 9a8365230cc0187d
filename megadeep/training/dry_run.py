"""``megadeep train CONFIG --dry-run [--world-size N] [--rank R]``: what one rank of the full-size run
would hold, in seconds on a laptop.

The run is resolved for the target world size, rank R's own model (its TP shard of its pipeline
stage) is built on the meta device through the same code the trainer uses, and its parameters are
counted; bytes of parameters, gradients and optimizer states and the activation peak come from the
planner's formulas (``megadeep.planner.memory``) applied to that count. No process group starts,
nothing is allocated or written.
"""
from __future__ import annotations

import os

import torch

from megadeep.errors import ConfigError
from megadeep.parallel import groups
from megadeep.planner.hardware import GPUS, GiB
from megadeep.model.accounting import cp_attention_bytes
from megadeep.planner.memory import DTYPE_BYTES, ActivationShape, model_states, persistent_numel, stage_activation_bytes
from megadeep.training.optimizer import ADAM_NAMES
from megadeep.training.run import ResolvedRun


def rank_modules(run: ResolvedRun, rank: int) -> tuple[dict[str, torch.nn.Module], list[str]]:
    """Rank ``rank``'s modules on the meta device by canonical name, and its stage's layer names."""
    from megadeep.pipeline.partition import stage_bounds
    from megadeep.pipeline.stages import layer_specs
    from megadeep.training.build import build_model

    cfg, layout, p = run.cfg, run.layout, run.cfg.parallel
    specs, names = layer_specs(cfg.model, p.sequence_parallel)
    with groups.simulate(layout, rank):
        if not run.pipelined:
            return {"": build_model(run, torch.device("meta"))}, names[:-1] if cfg.model.tie_embeddings else names
        parts = stage_bounds(cfg.model, p.tp, p.pp, p.partition_method)
        stage = layout.coord(rank).pp
        lo, hi = parts[stage], parts[stage + 1]
        with torch.device("meta"):
            return {names[i]: specs[i].build() for i in range(lo, hi)}, names[lo:hi]


def describe(run: ResolvedRun, rank: int, gpu: str = "H100-80", gpus_per_node: int = 8) -> str:
    """The dry-run report of ``rank``; raises :class:`ConfigError` (one line) when it does not fit ``gpu``."""
    cfg, layout = run.cfg, run.layout
    if not 0 <= rank < layout.world_size:
        raise ConfigError(f"--rank {rank} is outside the world of {layout.world_size} ranks")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    c = layout.coord(rank)
    modules, layer_names = rank_modules(run, rank)
    numels = [q.numel() for mod in modules.values() for q in mod.parameters()]
    n = sum(numels)
    # ZeRO shards over DP×CP (CP ranks hold the same weights)
    states = model_states(n, run.zero_stage, p.dp * p.cp, t.precision, persistent_numel(numels, run.persistence_threshold),
                          run.offload_optimizer)
    n_layers = sum(1 for name in layer_names if name.startswith("layers"))
    act_bytes = DTYPE_BYTES[t.precision]
    shape = ActivationShape(t.seq_len, t.micro_batch_size, m, p.tp, p.sequence_parallel, act_bytes=act_bytes,
                            cp=p.cp, cp_gathers_kv=run.cp_attention == "allgather")
    recompute = "full" if m.activation_checkpointing or p.pipeline_checkpoint_interval else "none"
    in_flight = min(p.pp - c.pp, t.grad_accum_steps)
    acts = stage_activation_bytes(shape, n_layers, in_flight, recompute, c.pp == 0, c.pp == p.pp - 1)
    local = rank % gpus_per_node
    device = (f"cuda:{local} (all {gpus_per_node} node GPUs visible; cuda:0 when each task gets one GPU)"
              if run.device_type == "cuda" else "cpu")
    backend = "nccl" if run.device_type == "cuda" else "gloo"
    nccl = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")) or "none set"
    offload = f"optimizer→{run.offload_optimizer}, params→{run.offload_param}"
    gpu_states = states.total
    if run.offload_optimizer != "none":
        gpu_states -= states.optimizer + states.grads
    if run.offload_param != "none":
        gpu_states -= states.params
    capacity = GPUS[gpu].memory
    lines = [
        f"rank {rank} of {layout.world_size}: TP {c.tp}/{p.tp}, "
        + (f"CP {layout.cp_index(rank)}/{p.cp} ({run.cp_attention}), " if p.cp > 1 else "")
        + f"DP {c.dp}/{p.dp}, PP {c.pp}/{p.pp}, "
        f"node {rank // gpus_per_node}, local rank {local}",
        f"layers: {', '.join(layer_names)}" if len(layer_names) < 8 else
        f"layers: {layer_names[0]} … {layer_names[-1]} ({n_layers} decoder blocks)",
        f"parameters on this rank: {n:,} ({n / 1e9:.3f} B)",
        f"ZeRO stage {run.zero_stage} ({cfg.deepspeed.config}), offload {offload}, {t.precision}: "
        f"params {states.params:,.0f} B, grads {states.grads:,.0f} B, optimizer {states.optimizer:,.0f} B",
        f"activations (peak, {in_flight} micro-batch(es) in flight, recompute={recompute}): {acts:,.0f} B",
        *([f"context parallel: {run.cp_attention} attention receives "
           f"{cp_attention_bytes(m, t.seq_len, t.micro_batch_size, p.tp, p.cp, run.cp_attention, act_bytes):,.0f} B "
           "per layer forward (as much again in backward)"] if p.cp > 1 else []),
        f"on the GPU (states + activations, before buffers): {(gpu_states + acts) / GiB:.1f} GiB of {gpu}'s "
        f"{capacity / GiB:.0f} GiB",
        f"adam: {ADAM_NAMES[run.adam]}; clipping by {'megadeep' if run.megadeep_clips else 'DeepSpeed'}",
        f"device {device}; backend {backend}, timeout {t.dist_timeout_s:.0f} s; NCCL env: {nccl}",
    ]
    if gpu_states + acts > capacity:
        raise ConfigError(f"rank {rank} (TP {c.tp}, DP {c.dp}, PP {c.pp}) needs {gpu_states + acts:,.0f} bytes "
                          f"({(gpu_states + acts) / GiB:.1f} GiB: states {gpu_states / GiB:.1f}, activations "
                          f"{acts / GiB:.1f}) but a {gpu} has {capacity / GiB:.0f} GiB; raise parallel.tp/pp or the ZeRO stage")
    return "\n".join(lines)



def cmd_dry_run(args) -> int:
    """``train --dry-run``: resolve for ``--world-size`` (default ``--nproc`` or 1), report ``--rank``."""
    from megadeep.config import load_config, resolve
    from megadeep.training.run import resolve_run

    world = args.world_size or args.nproc or 1
    cfg = resolve(load_config(args.config, args.overrides), world, require_data=False)
    device = "cpu" if cfg.train.device == "cpu" else "cuda"  # auto: the cluster the run is meant for
    print(describe(resolve_run(cfg, device), args.rank, args.gpu, args.gpus_per_node))
    return 0
