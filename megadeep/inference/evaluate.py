"""Loss and perplexity of a checkpoint on a validation split, at any layout.

The batches are the trainer's (``Trainer.evaluate``): ``eval_iters`` global batches of the held-out
split in order, each DP rank its own micro-batches, the mean of micro-batch losses averaged over DP.
So ``megadeep eval`` of a checkpoint reproduces the validation loss its run logged at that step.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megadeep.config.schema import RunConfig
from megadeep.data.loader import Loader, Samples
from megadeep.errors import ConfigError
from megadeep.parallel import groups


def eval_batches(samples: int, cfg: RunConfig, iters: int | None = None) -> int:
    """Global batches to evaluate: ``iters`` (default ``train.eval_iters``; 0: all the split holds).
    Like the trainer's, more batches than the split holds wrap around it."""
    gb = cfg.train.global_batch_size
    n = cfg.train.eval_iters if iters is None else (iters or samples // gb)
    if n < 1:
        raise ConfigError(f"the validation split holds {samples} samples, fewer than one global batch of "
                          f"train.global_batch_size={gb}")
    return n


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, val: Samples, cfg: RunConfig, device: torch.device,
                  iters: int | None = None) -> float:
    """Mean loss over :func:`eval_batches` global batches of ``val``, the trainer's way."""
    t = cfg.train
    dp_rank, dp = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
    loader = Loader(val, t.micro_batch_size, dp_rank, dp, t.seed, shuffle=False)
    n = eval_batches(len(val), cfg, iters) * t.grad_accum_steps
    loss = torch.stack([model(*(x.to(device) for x in next(loader))) for _ in range(n)]).mean().double().cpu()
    if dp > 1:
        dist.all_reduce(loss, group=groups.get_data_parallel_group())
        loss /= dp
    return loss.item()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
