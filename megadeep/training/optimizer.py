"""AdamW parameter groups, the Adam implementation for the device and ZeRO recipe, the LR schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from megadeep.config.deepspeed import offload_devices


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never norms or biases (anything with fewer than 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def choose_adam(ds_config: dict, device_type: str) -> str:
    """Pick the Adam implementation and set it in ``ds_config['optimizer']``; returns its name.

    Offloaded optimizer → DeepSpeedCPUAdam; CUDA → DeepSpeed FusedAdam; otherwise torch AdamW
    (foreach), which needs no JIT-built op on a CPU machine.
    """
    params = ds_config["optimizer"]["params"]
    if offload_devices(ds_config)[0] != "none":
        return "DeepSpeedCPUAdam"
    if device_type == "cuda":
        return "DeepSpeed FusedAdam"
    params.update(torch_adam=True, foreach=True)
    return "torch AdamW (foreach)"


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
