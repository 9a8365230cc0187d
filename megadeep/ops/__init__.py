"""Normalisation, activation and rotary-embedding ops, with megadeep's fused csrc kernels when they are built.

The model calls :func:`rms_norm`, :func:`swiglu` and :func:`rope`; whether they run fused kernels or plain PyTorch
is decided once per model by :func:`use_fused`. A fused op whose kernel does not take a tensor's
device or dtype runs plain PyTorch, and says so once.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from megadeep.ops import fused as _fused


@functools.cache
def _say_fallback(reason: str) -> None:
    warnings.warn(f"megadeep: {reason}; RMSNorm, SwiGLU and RoPE run in plain PyTorch", RuntimeWarning, stacklevel=3)


def use_fused(mode: str) -> bool:
    """``auto``: fused when the extension is built; ``on``: require it; ``off``: plain PyTorch."""
    if mode == "off":
        return False
    ok, why = _fused.load()
    if not ok and mode == "on":
        raise RuntimeError(
            f"model.fused_kernels=on but megadeep's csrc kernels cannot be used: {why}. Build them with "
            "`pip install --no-build-isolation -e .` (scripts/setup.sh does), or set model.fused_kernels=auto"
        )
    if not ok:
        _say_fallback(why)
    return ok


def _runs_fused(fused: bool, t: torch.Tensor) -> bool:
    if fused and not _fused.supports(t):
        _say_fallback(f"no fused kernel for {t.dtype} on {t.device.type} in this build")
        return False
    return fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    if _runs_fused(fused, x):
        return _fused.RMSNormFunction.apply(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def swiglu(gate_up: torch.Tensor, fused: bool = False, grad_in_place: bool = False) -> torch.Tensor:
    """``silu(gate) · up`` on the fused ``[..., gate | up]`` layout.

    ``grad_in_place``: the fused backward writes d(gate | up) over gate_up's memory instead of a new
    tensor (as large as the FFN's biggest activation). Only for callers whose gate_up is read by
    nothing after this op's backward, like the model's FFN; a leaf is refused (its data would be lost).
    """
    if _runs_fused(fused, gate_up):
        if grad_in_place and gate_up.is_leaf and gate_up.requires_grad:
            raise ValueError("swiglu(grad_in_place=True) would overwrite a leaf tensor with its own gradient")
        return _fused.SwiGLUFunction.apply(gate_up, grad_in_place)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Rotary embedding, rotate-half layout: ``x·cos + rotate_half(x)·sin`` for ``x [b, s, heads, d]``
    and tables shaped to broadcast over the heads, ``[s, 1, d]`` or ``[b, s, 1, d]``. Tables that need a
    gradient run plain PyTorch (the kernel gives none for them)."""
    if _runs_fused(fused, x) and x.dim() == 4 and cos.dim() in (3, 4) and not (cos.requires_grad or sin.requires_grad):
        def table(t):
            t = t.squeeze(-2)
            return (t if t.dim() == 3 else t.unsqueeze(0)).to(x.dtype).contiguous()

        return _fused.RopeFunction.apply(x, table(cos), table(sin))
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
