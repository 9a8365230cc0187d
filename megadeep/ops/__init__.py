"""Normalisation and activation ops, with megadeep's fused csrc kernels when they are built.

The model calls :func:`rms_norm` and :func:`swiglu`; whether they run fused kernels or plain PyTorch
is decided once per model by :func:`use_fused`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def use_fused(mode: str) -> bool:
    """``auto``: fused when the extension is built; ``on``: require it; ``off``: plain PyTorch."""
    if mode == "on":
        raise RuntimeError("model.fused_kernels=on but megadeep's csrc extension is not built")
    return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def swiglu(gate_up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """``silu(gate) · up`` on the fused ``[..., gate | up]`` layout."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
