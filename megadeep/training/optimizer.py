"""AdamW parameter groups, the Adam implementation for the device and ZeRO recipe, the LR schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from megadeep.config.deepspeed import offload_devices
from megadeep.errors import ConfigError
from megadeep.parallel.experts import is_expert


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never norms or biases (anything with fewer than 2 dims). A
    parameter partitioned by ``zero.Init`` is an empty placeholder: its shape is ``ds_shape``."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    out = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if not any(is_expert(p) for p in decay + no_decay):
        return out
    # MoE experts: own groups per expert group name ('moe': True), which DeepSpeed's engine and ZeRO
    # partition and reduce over the expert-data-parallel ranks
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    for group, name in zip(out, ("decay", "no_decay")):
        group["name"] = name
    return [g for g in split_params_into_different_moe_groups_for_optimizer(out) if g["params"]]


ADAM_NAMES = {
    "apex_fused": "apex FusedAdam",
    "ds_fused": "DeepSpeed FusedAdam",
    "ds_cpu_adam": "DeepSpeedCPUAdam",
    "torch": "torch AdamW (fused)",
}


def apex_fused_adam():
    """apex's FusedAdam class when apex is installed with its CUDA extensions, else None."""
    try:
        import amp_C  # noqa: F401  (apex's fused kernels; FusedAdam refuses to build without them)
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


@dataclass
class AdamChoice:
    key: str  # a deepspeed.optimizer value other than "auto"
    client: Callable | None  # builds a client optimizer from param groups; None: DeepSpeed builds it

    @property
    def name(self) -> str:
        return ADAM_NAMES[self.key]


def resolve_adam(requested: str, offloaded: bool, device_type: str, apex_available: bool) -> str:
    """The Adam implementation for a run: the user's choice, or for ``auto`` the fastest that fits."""
    if requested == "auto":
        if offloaded:
            return "ds_cpu_adam"
        if device_type == "cuda":
            return "apex_fused" if apex_available else "ds_fused"
        return "torch"
    if requested == "apex_fused" and not (device_type == "cuda" and apex_available):
        raise ConfigError("deepspeed.optimizer=apex_fused needs CUDA and apex built with --cuda_ext; "
                          "use deepspeed.optimizer=auto")
    if requested == "ds_fused" and device_type != "cuda":
        raise ConfigError("deepspeed.optimizer=ds_fused needs CUDA; use deepspeed.optimizer=auto (torch's fused AdamW on CPU)")
    return requested


def choose_adam(ds_config: dict, device_type: str, requested: str = "auto") -> AdamChoice:
    """Pick the Adam implementation and set ``ds_config`` up for it.

    An offloaded optimizer steps on the CPU, where DeepSpeed builds DeepSpeedCPUAdam from the
    ``optimizer`` block; on CUDA apex's FusedAdam (a client optimizer, so the block goes) or else
    DeepSpeed's FusedAdam; on a CPU device torch's fused AdamW (one vectorised pass over each tensor:
    2× its foreach variant here, bench/adam), which needs no JIT-built op. DeepSpeedCPUAdam is faster
    still but only where ZeRO-Offload builds it; as a client optimizer it would JIT-build a C++ op in
    every fresh environment and round differently per tensor size (SIMD body vs scalar tail).
    Combinations that cannot work are refused by ``megadeep.config.validate`` before launch.
    """
    offloaded = offload_devices(ds_config)[0] != "none"
    key = resolve_adam(requested, offloaded, device_type, apex_fused_adam() is not None)
    params = ds_config["optimizer"]["params"]
    if key == "torch":
        params.update(torch_adam=True, fused=True)  # DeepSpeed passes unknown params to torch.optim.AdamW
    if key != "apex_fused":
        return AdamChoice(key, None)
    del ds_config["optimizer"]
    fused_adam = apex_fused_adam()
    return AdamChoice(key, lambda groups: fused_adam(groups, adam_w_mode=True, **params))


def lr_lambda(steps: int, warmup: int, lr: float, min_lr: float):
    """Multiplier of ``lr`` for 0-based step ``s``: linear warmup reaching ``lr`` at step ``warmup``,
    then cosine decay to ``min_lr`` at the last step (Megatron's schedule)."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        return (min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)) / lr

    return factor


def lr_scheduler(steps: int, warmup: int, lr: float, min_lr: float):
    """For ``deepspeed.initialize(lr_scheduler=...)``: DeepSpeed steps it and saves it in checkpoints."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, warmup, lr, min_lr))
