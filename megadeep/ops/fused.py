"""megadeep's csrc kernels (the ``megadeep._C`` extension) as autograd functions.

The extension is built by ``pip install -e .``, never compiled at run time. :func:`load` says whether
it can run here and, if not, why; the ops themselves live in ``torch.ops.megadeep``.
"""
from __future__ import annotations

import functools
import platform

import torch

# Storage dtypes each backend's kernels take (all accumulate in fp32, or fp64 for fp64 on CPU).
DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}


@functools.cache
def load() -> tuple[bool, str]:
    """(loaded, why not). On x86 the build uses AVX2/FMA, so it is only loaded where torch sees AVX2."""
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False, "this CPU has no AVX2, which the build of megadeep._C needs"
    try:
        from megadeep import _C  # noqa: F401  (registers torch.ops.megadeep.*)
    except ImportError as e:
        return False, f"megadeep._C is not built ({e})"
    _register_fakes()
    return True, ""


@functools.cache
def cuda_built() -> bool:
    return torch.ops.megadeep.cuda_built()


def supports(t: torch.Tensor) -> bool:
    """Whether a built kernel takes this tensor's device and dtype (call after :func:`load` succeeded)."""
    if t.device.type == "cuda" and not cuda_built():
        return False
    return t.dtype in DTYPES.get(t.device.type, ())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    """Shapes of the ops' outputs, so torch.compile can trace models that use them."""

    @torch.library.register_fake("megadeep::rms_norm_fwd")
    def _(x, weight, eps):
        return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))

    @torch.library.register_fake("megadeep::rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake("megadeep::swiglu_fwd")
    def _(gate_up):
        return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @torch.library.register_fake("megadeep::swiglu_bwd")
    def _(dout, gate_up):
        return torch.empty_like(gate_up)

    @torch.library.register_fake("megadeep::swiglu_bwd_")
    def _(dout, gate_up):
        return None

    @torch.library.register_fake("megadeep::rope")
    def _(x, cos, sin, backward):
        return x.new_empty(x.shape)


class RMSNormFunction(torch.autograd.Function):
    """y = x · rsqrt(mean(x²) + eps) · w; saves x and the per-row rstd, not the normalised x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        y, rstd = torch.ops.megadeep.rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.megadeep.rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        return dx, dw, None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) · up on ``[..., gate | up]``; the gradient comes back in the same fused layout,
    written over gate_up itself when ``grad_in_place`` (see :func:`megadeep.ops.swiglu`)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, grad_in_place: bool = False) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        ctx.grad_in_place = grad_in_place
        return torch.ops.megadeep.swiglu_fwd(gate_up)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        if ctx.grad_in_place:
            torch.ops.megadeep.swiglu_bwd_(dout.contiguous(), gate_up)
            # Custom ops do not bump the version counter themselves: with it bumped, a second backward
            # through this node (retain_graph) fails autograd's saved-tensor check instead of using garbage.
            torch.autograd.graph.increment_version(gate_up)
            return gate_up, None
        return torch.ops.megadeep.swiglu_bwd(dout.contiguous(), gate_up), None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The kernel takes any layout with unit stride along head_dim (q/k views of the qkv output as they are)."""
    return torch.ops.megadeep.rope(x if x.stride(-1) == 1 else x.contiguous(), cos, sin, backward)


class RopeFunction(torch.autograd.Function):
    """Rotary embedding of ``x [b, s, heads, d]`` with tables ``[1 or b, s, d]`` (no gradient for the
    tables): the backward is the same kernel applying the rotation's transpose."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rope(dy, cos, sin, True), None, None
