"""Workarounds for DeepSpeed bugs megadeep's runs hit, each gated on the versions that have it.

ZeRO-3 fp32 master copy (deepspeed/runtime/zero/stage3.py, ``_create_fp32_partitions``, ~line 1161
in 0.19.8): when the flat partition already has the master dtype and device, DeepSpeed means to use it
as the fp32 master instead of cloning it, but it compares ``tensor.device == self.device`` where
``self.device`` is the accelerator's device *name* (a str such as 'cpu' or 'cuda:0'); a torch.device
never equals a str, so every fp32 ZeRO-3 run keeps a second fp32 copy of its parameter partition
(4 B/param more: 1.25x the parameter + optimizer partitions in ``bench.construction``). The fix gives
that method a torch.device for the duration of the call; with optimizer offload DeepSpeed takes an
earlier branch, so nothing changes there. Checked present in 0.19.8 (the version pinned here); the
gate is an upper bound to be raised while the comparison stays the same.
"""
from __future__ import annotations

import functools

import torch

BUGGY_BELOW = (0, 20, 0)  # first version not checked; re-check the comparison before raising


def _version(v: str) -> tuple:
    return tuple(int("".join(c for c in x if c.isdigit()) or 0) for x in v.split(".")[:3])


def share_zero3_fp32_master() -> bool:
    """Patch DeepSpeed's ZeRO-3 optimizer so fp32 runs use the parameter partition as the master copy
    (idempotent). Returns whether the patch is in place."""
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    if _version(deepspeed.__version__) >= BUGGY_BELOW:
        return False
    create = Stage3._create_fp32_partitions
    if getattr(create, "_megadeep_fixed", False):
        return True

    @functools.wraps(create)
    def create_fp32_partitions(self):
        name = self.device
        if isinstance(name, str) and not self.offload_optimizer:
            self.device = torch.device(name)
        try:
            return create(self)
        finally:
            self.device = name

    create_fp32_partitions._megadeep_fixed = True
    Stage3._create_fp32_partitions = create_fp32_partitions
    return True
