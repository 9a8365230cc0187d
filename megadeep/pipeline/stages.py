"""The Llama decoder as a sequence of DeepSpeed layer specs, cut into pipeline stages.

The layers are the classes of :mod:`megadeep.model.llama`, not a second model: token embedding,
N blocks, final norm, LM head. With tied embeddings the head *is* the embedding module
(``TiedLayerSpec``): the first and the last stage each hold a copy, and the engine sums the two
gradients before every step so the copies stay equal.

The stages are megadeep's cut (megadeep.pipeline.partition). Layers are built on the meta device,
then this stage's layers are allocated and
initialised once under their canonical names (``tok_embeddings``, ``layers.i``, ``norm``, ``output``),
so a stage holds exactly the weights of the single-process model and nothing else.
"""
from __future__ import annotations

import contextlib
import io
from functools import partial

import deepspeed.comm as dist
import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from megadeep import ops
from megadeep.config.schema import ModelConfig, RunConfig
from megadeep.model.llama import Block, OutputHead, RMSNorm, TokenEmbedding, lm_loss, materialize, tied_logits
from megadeep.parallel.random import checkpoint
from megadeep.pipeline.partition import describe, layer_names, stage_bounds

TIED = "tok_embeddings"  # the tie key is the embedding's canonical name


def layer_specs(cfg: ModelConfig, sequence_parallel: bool) -> tuple[list[LayerSpec], list[str]]:
    """The specs in forward order and the canonical name of each."""
    sp, fused = sequence_parallel, ops.use_fused(cfg.fused_kernels)
    if cfg.tie_embeddings:
        embed = TiedLayerSpec(TIED, TokenEmbedding, cfg, sp)
        head = TiedLayerSpec(TIED, TokenEmbedding, cfg, sp, forward_fn=tied_logits)
    else:
        embed, head = LayerSpec(TokenEmbedding, cfg, sp), LayerSpec(OutputHead, cfg, sp)
    blocks = [LayerSpec(Block, cfg, i, sp, fused) for i in range(cfg.n_layers)]
    specs = [embed, *blocks, LayerSpec(RMSNorm, cfg.dim, cfg.norm_eps, sp, fused), head]
    return specs, layer_names(cfg)


class PipelinedLlama(PipelineModule):
    """This rank's stage of the Llama decoder, trained by DeepSpeed's 1F1B pipeline engine."""

    def __init__(self, cfg: RunConfig, topology, device: torch.device | str = "cpu"):
        p, m = cfg.parallel, cfg.model
        specs, names = layer_specs(m, p.sequence_parallel)
        # megadeep's stage bounds (see megadeep.pipeline.partition), read by _partition_layers below
        self._megadeep_bounds = stage_bounds(m, p.tp, p.pp, p.partition_method)
        # read by _build, which the base class calls before returning (device "meta": leave unallocated)
        object.__setattr__(self, "_build_args", (names, torch.device(device), cfg.train.seed))
        # DeepSpeed prints its own partition table of class names on rank 0; stage_map() names layers.
        with contextlib.redirect_stdout(io.StringIO()):
            super().__init__(
                specs, topology=topology,
                loss_fn=partial(lm_loss, vocab_size=m.vocab_size, cp_grad_scale=p.cp),  # see topology()
                partition_method=p.partition_method,
                activation_checkpoint_interval=p.pipeline_checkpoint_interval,
                # ours replays the TP RNG streams, so dropout masks match in the recomputation
                activation_checkpoint_func=checkpoint, checkpointable_layers=[Block.__name__],
            )
        self.partition_method = p.partition_method
        self.layer_names = names if not m.tie_embeddings else [*names[:-1], f"output (tied to {TIED})"]
        self.canonical_modules = self._canonical_modules(names)

    def _canonical_modules(self, names: list[str]) -> dict[str, torch.nn.Module]:
        out = {key: child for key, child in self.tied_modules.items()}
        for name, child in self.named_children():
            if name.isdigit():  # DeepSpeed registers layer i as child "i"
                out[names[int(name)]] = child
        return out

    def _build(self):
        names, device, seed = self._build_args
        with torch.device("meta"):
            super()._build()
        if device.type != "meta":
            materialize(self, self._canonical_modules(names), device, seed)

    def _partition_layers(self, method: str) -> None:
        """DeepSpeed's hook for cutting the stages: take megadeep's bounds instead of its partitioners."""
        self.parts = list(self._megadeep_bounds)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def canonical_parameters(self) -> dict[str, torch.nn.Parameter]:
        """This stage's parameters under the single-process model's names (checkpoints use them)."""
        return {f"{name}.{pn}": p for name, child in self.canonical_modules.items()
                for pn, p in child.named_parameters()}

    def forward(self, inputs):
        # Sequence-parallel activations leave their layers as strided views; p2p sends want them dense.
        return super().forward(inputs).contiguous()

    def _synchronize_tied_weights(self) -> None:
        """DeepSpeed's copy of the tied weight from the first stage to the others (after building and
        loading), through a detached alias: broadcasting into the parameter itself makes autograd
        attach a hook that warns about the broadcast on every backward."""
        for comm in self.tied_comms.values():
            for attr in comm["weight_attr"]:
                weight = self._recursive_getattr(comm["module"], attr)
                dist.broadcast(weight.detach(), src=min(comm["ranks"]), group=comm["group"])

    def stage_map(self) -> str:
        lines = [f"pipeline: {self.num_stages} stages, partition_method={self.partition_method}"]
        for s in range(self.num_stages):
            lines.append(f"  stage {s}: {describe(self.layer_names[self.parts[s]:self.parts[s + 1]])}")
        return "\n".join(lines)
