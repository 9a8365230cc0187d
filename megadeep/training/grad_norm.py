"""The global gradient norm of a DP×TP×PP model, and clipping by it when megadeep owns clipping.

With fp32 and no ZeRO, DeepSpeed clips with ``mpu.get_model_parallel_group()``; under the pipeline
engine that is the whole TP×PP replica and its rank 0 alone counts TP-replicated parameters, so the
norms of later stages are dropped and the tied embedding is counted twice. megadeep therefore turns
DeepSpeed's clipping off there (``config.deepspeed.megadeep_clips``) and clips in an optimizer
pre-step hook, for every layout alike.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megadeep.parallel import groups
from megadeep.parallel.experts import is_expert


def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """Σ‖g‖² over ``grads`` as a CPU fp64 scalar: one fused norm kernel per tensor (no fp64 copy of
    any gradient), the per-tensor norms squared and summed in fp64, so that how a layout splits a
    tensor into TP shards changes the result by no more than fp32 rounding of each piece."""
    total = torch.zeros((), dtype=torch.float64)
    by_device_dtype: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_device_dtype.setdefault((g.device, g.dtype), []).append(g)
    for group in by_device_dtype.values():
        norms = torch._foreach_norm(group, 2)  # what torch.nn.utils.clip_grad_norm_ uses
        total += torch.stack(norms).double().pow(2).sum().cpu()
    return total


def global_grad_norm(params) -> float:
    """L2 norm of the full model's gradient, as the single-process model computes it.

    Each value is counted once: a TP-replicated parameter on TP rank 0 only, a pipeline-tied copy
    only where DeepSpeed did not mark it ``ds_pipe_replicated``, MoE experts (each EP rank holds
    others) summed over the EP group; the sum runs over TP and PP.
    """
    first_tp_rank = groups.get_tensor_model_parallel_rank() == 0
    grads = [p for p in params
             if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
             and (getattr(p, "tensor_model_parallel", False) or first_tp_rank)]
    total = sum_of_squares([p.grad.detach() for p in grads if not is_expert(p)])
    experts = sum_of_squares([p.grad.detach() for p in grads if is_expert(p)])
    if groups.get_expert_parallel_world_size() > 1:
        dist.all_reduce(experts, group=groups.get_expert_parallel_group())
    total += experts
    if groups.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=groups.get_tensor_model_parallel_group())
    if groups.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=groups.get_pipeline_model_parallel_group())
    return math.sqrt(total.item())


class ClipByGlobalNorm:
    """Optimizer pre-step hook: measure the global norm of the (DP-reduced) gradients and clip them
    to ``max_norm`` (0: measure only). ``norm`` holds the last measurement.

    A non-finite norm skips the update instead: this optimizer is DeepSpeed's unwrapped one (fp32,
    ZeRO 0), which has no overflow check of its own. The parameters are hidden from it for that one
    step (no moment, step-count or weight-decay change) and ``overflow`` is raised, the flag
    DeepSpeed's engine reads from its own wrappers, so the LR schedule and ``skipped_steps`` behave
    as under ZeRO.

    Clipping multiplies by torch's coefficient ``max_norm / (norm + 1e-6)`` only when it is below 1
    (multiplying by 1.0 changes nothing, and the norm is already on the host). Under torch's fused
    Adam/AdamW the coefficient rides in the step instead of a pass of its own over every gradient:
    the fused kernel divides each gradient by the optimizer's ``grad_scale`` (the attribute AMP's
    GradScaler sets) and writes it back, clipped, in the same pass: one read and write of every
    gradient fewer per step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params, max_norm: float):
        self.params, self.max_norm = list(params), max_norm
        self.norm: float | None = None
        self.in_step = isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))
        optimizer.register_step_pre_hook(self)
        if self.in_step:
            optimizer.register_step_post_hook(lambda opt, args, kwargs: setattr(opt, "grad_scale", None))

    def __call__(self, optimizer, args, kwargs) -> None:
        self.norm = global_grad_norm(self.params)
        optimizer.overflow = not math.isfinite(self.norm)
        if optimizer.overflow:
            hidden = [group["params"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["params"] = []

            def restore(opt, args, kwargs):
                for group, params in zip(opt.param_groups, hidden):
                    group["params"] = params
                handle.remove()

            handle = optimizer.register_step_post_hook(restore)
        elif self.max_norm > 0 and self.max_norm / (self.norm + 1e-6) < 1:
            if self.in_step:
                optimizer.grad_scale = torch.tensor((self.norm + 1e-6) / self.max_norm, dtype=torch.float32)
            else:
                grads = [p for p in self.params if p.grad is not None]
                torch.nn.utils.clip_grads_with_norm_(grads, self.max_norm, torch.tensor(self.norm))
