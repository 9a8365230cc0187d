"""The resolved run: every fact about a validated config that more than one place needs, decided once.

``train``, ``memory``, ``--dry-run`` and ``launch slurm`` read the layout, the ZeRO recipe and its stage,
the offload devices, the Adam implementation and who clips gradients from here instead of re-reading
the recipe from disk and rebuilding the layout each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megadeep.config.deepspeed import compose, load_recipe, megadeep_clips, offload_devices, zero_stage
from megadeep.config.schema import RunConfig
from megadeep.model.attention import DocumentSpec
from megadeep.parallel.cp_choice import pick
from megadeep.parallel.layout import Layout
from megadeep.training.optimizer import apex_fused_adam, resolve_adam


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig  # validated for the world size (``megadeep.config.resolve``)
    layout: Layout
    recipe: dict  # the ZeRO recipe as read from ds_configs/ (or the user's JSON)
    zero_stage: int
    offload_optimizer: str  # none | cpu | nvme
    offload_param: str
    device_type: str  # cuda | cpu
    adam: str  # a deepspeed.optimizer key other than auto (see ``training.optimizer.resolve_adam``)
    megadeep_clips: bool  # fp32 without ZeRO: megadeep clips by the global norm, else DeepSpeed does
    cp_attention: str = "ulysses"  # the context-parallel attention (parallel.cp_attention with auto decided)
    documents: DocumentSpec | None = None  # data.document_mask: where packed documents end

    @property
    def cp_grad_scale(self) -> float:
        """How the CP loss share is scaled (``context.loss_share``): DeepSpeed's engine and ZeRO 1/2 sum
        gradients over CP (its Ulysses convention); the pipeline engine (data axis = DP×CP) and ZeRO-3's
        reduce-scatter (pinned in ``compose``) average over DP×CP."""
        return float(self.layout.cp) if self.pipelined or self.zero_stage == 3 else 1.0

    @property
    def describe_cp(self) -> str:
        """For the start-up line."""
        return f" CP={self.layout.cp} ({self.cp_attention})" if self.layout.cp > 1 else ""

    @property
    def host_allocator(self) -> str:
        """How the rank's allocator treats freed host memory (``training.host_memory``): ``lean`` for
        CPU ranks under ZeRO-3, whose partitions are what bounds their memory; ``reuse`` for other CPU
        ranks, where mapping large tensors afresh each step costs time (a 60M ZeRO-0 step 13% with
        lean, 1.85 s -> 2.10 s); ``system`` (glibc's defaults) for GPU ranks."""
        if self.device_type != "cpu":
            return "system"
        return "lean" if self.zero_stage == 3 else "reuse"

    @property
    def pipelined(self) -> bool:
        return self.layout.pp > 1

    @property
    def persistence_threshold(self) -> int:
        return int(self.recipe.get("zero_optimization", {}).get("stage3_param_persistence_threshold", 100000))

    def ds_config(self) -> dict:
        """A fresh DeepSpeed config dict (``choose_adam`` edits it for the optimizer it picks)."""
        return compose(self.cfg, self.recipe)


def resolve_run(cfg: RunConfig, device_type: str) -> ResolvedRun:
    """``cfg`` must already be resolved for its world size; ``device_type`` is the ranks' (cuda | cpu)."""
    p = cfg.parallel
    recipe = load_recipe(cfg.deepspeed.config)
    stage = zero_stage(recipe)
    opt, param = offload_devices(recipe)
    # apex can only be probed where the ranks run; elsewhere (a login node writing a batch script, a
    # laptop's dry run) a requested apex_fused is taken on trust and auto assumes DeepSpeed's FusedAdam
    here = device_type == "cuda" and torch.cuda.is_available()
    apex = apex_fused_adam() is not None if here else cfg.deepspeed.optimizer == "apex_fused"
    adam = resolve_adam(cfg.deepspeed.optimizer, opt != "none", device_type, device_type == "cuda" and apex)
    d = cfg.data
    documents = DocumentSpec(d.document_sep, d.document_positions) if d.document_mask else None
    return ResolvedRun(cfg, Layout(tp=p.tp, dp=p.dp, pp=p.pp, cp=p.cp, ep=p.ep), recipe, stage, opt, param, device_type, adam,
                       megadeep_clips(cfg, recipe), pick(p.cp_attention, cfg.model.kv_heads // p.tp, p.cp), documents)
