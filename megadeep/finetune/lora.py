"""LoRA on megadeep's tensor-parallel layers: ``W x + (α/r)·B A x`` with ``W`` frozen.

PEFT wraps ``nn.Linear``; our layers are column/row-parallel shards, so the adapter has to follow
the shard (which PEFT cannot do): on a column-parallel layer (``[out/TP, in]``) ``A`` is replicated
and ``B`` is cut like the weight's rows (the fused q|k|v and gate|up blocks included), on a row-parallel
layer (``[out, in/TP]``) ``A`` is cut like the weight's columns and ``B`` is replicated. The
communication is the layer's own pattern on ``r`` columns: an identity/all-reduce pair around ``A x``.
A fused layer has one ``A`` for its blocks; exported to PEFT it is the same ``lora_A`` on each of the
Hugging Face projections it stacks (``finetune.peft``), which computes the same function.

The adapter is a child module called from a forward hook of the layer, so parameter names stay
canonical (``layers.N.attention.wqkv.weight`` is the base, ``...wqkv.lora.A`` / ``.lora.B`` the
adapter) and ZeRO-3 gathers the adapter like any other module.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megadeep.config.schema import LORA_TARGETS, LoraConfig
from megadeep.model.llama import Transformer, init_weights
from megadeep.parallel import comm
from megadeep.parallel.layers import ColumnParallelLinear, RowParallelLinear, init_sharded_, normal_fill, zeros_fill
from megadeep.parallel.random import get_rng_tracker
from megadeep.parallel.sharding import mark

# target name → the module path under each block
TARGETS = dict(zip(LORA_TARGETS, ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")))


class LoRA(nn.Module):
    """The adapter of one TP layer (built on the layer's device, initialised by ``reset_parameters``:
    ``A`` normal with std 1/√in, as PEFT's Kaiming-uniform default in scale; ``B`` zero)."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.column = isinstance(layer, ColumnParallelLinear)
        self.scale, self.dropout, self.in_features = alpha / rank, dropout, layer.in_features
        w = layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        if self.column:  # A replicated, B cut like W's rows
            self.A = mark(nn.Parameter(torch.empty(rank, w.shape[1], **kw)), None)
            self.B = mark(nn.Parameter(torch.empty(w.shape[0], rank, **kw)), 0, w.partition_blocks)
        else:  # A cut like W's columns, B replicated
            self.A = mark(nn.Parameter(torch.empty(rank, w.shape[1], **kw)), 1)
            self.B = mark(nn.Parameter(torch.empty(w.shape[0], rank, **kw)), None)

    def reset_parameters(self, key: int | None = None) -> None:
        init_sharded_(self.A, normal_fill(1 / math.sqrt(self.in_features)), key)
        init_sharded_(self.B, zeros_fill, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout:
            # the column layer's input is the same on every TP rank (so is the default generator);
            # the row layer's input is each rank's own slice: a mask of its own
            with contextlib.nullcontext() if self.column else get_rng_tracker().fork():
                x = F.dropout(x, self.dropout)
        if self.column:
            return F.linear(comm.copy_to_tensor_parallel_region(F.linear(x, self.A)), self.B) * self.scale
        return F.linear(comm.reduce_from_tensor_parallel_region(F.linear(x, self.A)), self.B) * self.scale


def _add_adapter(layer: nn.Module, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return output + layer.lora(x)


def apply_lora(model: Transformer, cfg: LoraConfig, seed: int) -> list[str]:
    """Freeze ``model`` and give each target layer an adapter (initialised from ``seed`` under its
    canonical name, so every layout starts from the same adapters). Returns the adapted layers' names."""
    if model.sequence_parallel:
        raise NotImplementedError("LoRA with sequence parallelism")
    model.requires_grad_(False)
    names = []
    for i, block in enumerate(model.layers):
        for target in cfg.targets:
            path = TARGETS[target]
            layer = block.get_submodule(path)
            assert isinstance(layer, (ColumnParallelLinear, RowParallelLinear)), path
            layer.lora = LoRA(layer, cfg.rank, cfg.alpha, cfg.dropout)
            name = f"layers.{block.layer_id}.{path}"
            init_weights(layer.lora, f"{name}.lora", seed)
            layer.register_forward_hook(lambda mod, args, out: _add_adapter(mod, out, args[0]))
            names.append(name)
    return names


def adapter_names(name: str) -> tuple[str, str] | None:
    """``(layer weight, 'A' | 'B')`` of an adapter parameter's canonical name, else None."""
    layer, sep, which = name.rpartition(".lora.")
    return (f"{layer}.weight", which) if sep else None
