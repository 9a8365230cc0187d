"""Build this rank's model without ever holding more than its own shards.

Three paths, one initialisation (``model.llama.init_weights``, once, each parameter under its
canonical name, values from the counter RNG so any shard equals the single-process model's slice):

- pipeline: the stage's layers on the meta device, then allocated and initialised (``PipelinedLlama``);
- ZeRO-3: ``deepspeed.zero.Init`` partitions each module's parameters over data parallelism as it is
  built, and each rank then writes only the elements of its partition, so a model larger than one
  rank's memory can start;
- otherwise: the whole (TP-sharded) model on the meta device, then ``to_empty`` and initialise.
"""
from __future__ import annotations

import torch
from torch import nn

from megadeep.model.llama import Transformer, cached_rope_tables, init_weights, materialize
from megadeep.parallel import groups
from megadeep.parallel.layers import deferred_init
from megadeep.training.run import ResolvedRun


def build_model(run: ResolvedRun, device: torch.device, ds_config: dict | None = None) -> nn.Module:
    """This rank's model on ``device`` (``meta``: shapes only, as ``--dry-run`` uses). Process groups
    must be set up (or simulated, ``groups.simulate``) for the rank's TP/PP coordinates."""
    cfg = run.cfg
    sp = cfg.parallel.sequence_parallel
    if run.pipelined:
        from megadeep.pipeline import PipelinedLlama, topology

        return PipelinedLlama(cfg, topology(run.layout), device)
    if run.zero_stage == 3 and device.type != "meta":
        import deepspeed

        # partitioned over DP×CP (DP at CP=1), the group the engine shards and reduces over (zero.Init
        # ignores mpu's groups); mem_efficient_linear off: it swaps F.linear for its own autograd function
        with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=groups, mem_efficient_linear=False,
                                 data_parallel_group=groups.get_sequence_data_parallel_group()), deferred_init():
            model = Transformer(cfg.model, sp, run.documents, run.cp_attention, run.cp_grad_scale)
        init_weights(model, "", cfg.train.seed)
        return model
    with torch.device("meta"):
        model = Transformer(cfg.model, sp, run.documents, run.cp_attention, run.cp_grad_scale)
    if device.type != "meta":
        materialize(model, {"": model}, device, cfg.train.seed)
        if cfg.train.compile:
            compile_blocks(model)
    return model


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place, as torchtitan does: small graphs that compile
    once (the blocks share code), while embedding, head and loss stay eager for DeepSpeed's hooks.
    The RoPE table cache is filled first: filled inside the first compiled call, it was traced into
    that graph and its change then recompiled the blocks' code a second time."""
    for block in model.layers:
        a = block.attention
        cached_rope_tables(a.max_seq_len, a.max_seq_len, a.head_dim, a.theta, a.wqkv.weight.device,
                           a.wqkv.weight.dtype, a.rope_scaling)
        block.compile()
