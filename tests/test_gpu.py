"""What only a GPU can check, run by ``scripts/gpu-check.sh`` (every test here is marked ``gpu``; without
CUDA each is skipped with the reason, and under the script a skip is a failure: see conftest.py)."""
import re
import subprocess
import sys

import pytest
import torch

from megadeep import ops
from megadeep.config.deepspeed import available_recipes, load_recipe, offload_devices
from megadeep.ops import fused
from tests.helpers import ROOT, write_text

pytestmark = pytest.mark.gpu
EPS = 1e-5
BF16_TOLERANCE = 0.02  # bf16 loss within 2% (relative) of the fp32 loss at every one of 40 steps


def reference(x, w, gate_up, dy, dout):
    """RMSNorm and SwiGLU forward and backward in fp64 on the CPU."""
    x, w, gate_up = (t.detach().double().cpu().requires_grad_() for t in (x, w, gate_up))
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w
    gate, up = gate_up.chunk(2, -1)
    out = torch.nn.functional.silu(gate) * up
    torch.autograd.backward([y, out], [dy.double().cpu(), dout.double().cpu()])
    return y, x.grad, w.grad, out, gate_up.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_match_fp64(dtype):
    assert fused.load()[0] and fused.cuda_built(), "megadeep._C is not built with CUDA kernels on this machine"
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, hidden = 257, 1000  # odd sizes: tails of every vectorised loop
    x = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype).requires_grad_()
    w = torch.randn(hidden, device="cuda", generator=g).to(dtype).requires_grad_()
    gate_up = torch.randn(rows, 2 * hidden, device="cuda", generator=g).to(dtype).requires_grad_()
    dy, dout = (torch.randn(rows, hidden, device="cuda", generator=g).to(dtype) for _ in range(2))
    assert fused.supports(x), f"no CUDA kernel for {dtype}"
    y = ops.rms_norm(x, w, EPS, fused=True)
    out = ops.swiglu(gate_up, fused=True)
    torch.autograd.backward([y, out], [dy, dout])
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    for name, got, ref in zip(("rms y", "rms dx", "rms dw", "swiglu out", "swiglu d"),
                              (y, x.grad, w.grad, out, gate_up.grad), reference(x, w, gate_up, dy, dout)):
        err = ((got.double().cpu() - ref).abs().max() / ref.abs().max()).item()
        print(f"{dtype} {name}: rel err {err:.2e}")
        assert err < tol, (dtype, name, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_rope_matches_fp64(dtype):
    """q as a strided view of a fused qkv output (odd head count and half width), per-document tables."""
    assert fused.load()[0] and fused.cuda_built(), "megadeep._C is not built with CUDA kernels on this machine"
    g = torch.Generator(device="cuda").manual_seed(0)
    b, s, h, d = 3, 129, 5, 66
    qkv = torch.randn(b, s, 3 * h * d, device="cuda", generator=g).to(dtype)
    x = qkv[..., h * d:2 * h * d].unflatten(-1, (h, d)).requires_grad_()
    cos, sin = (torch.rand(b, s, 1, d, device="cuda", generator=g).to(dtype) * 2 - 1 for _ in range(2))
    dy = torch.randn(b, s, h, d, device="cuda", generator=g).to(dtype)
    y = ops.rope(x, cos, sin, fused=True)
    assert type(y.grad_fn).__name__ == "RopeFunctionBackward"
    y.backward(dy)
    ref_x = x.detach().double().cpu().requires_grad_()
    x1, x2 = ref_x.chunk(2, -1)
    ref = ref_x * cos.double().cpu() + torch.cat([-x2, x1], -1) * sin.double().cpu()
    ref.backward(dy.double().cpu())
    tol = 1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    for name, got, want in (("rope y", y, ref), ("rope dx", x.grad, ref_x.grad)):
        err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
        print(f"{dtype} {name}: rel err {err:.2e}")
        assert err < tol, (dtype, name, err)


def expected_adam(recipe: str) -> str:
    from megadeep.training.optimizer import ADAM_NAMES, apex_fused_adam

    if offload_devices(load_recipe(recipe))[0] != "none":
        return ADAM_NAMES["ds_cpu_adam"]
    return ADAM_NAMES["apex_fused" if apex_fused_adam() is not None else "ds_fused"]


def tiny(text, *extra: str) -> list[str]:
    return ["data.source=bytes", f"data.paths=[{text}]", "model.dim=256", "model.n_layers=4", "model.n_heads=8",
            "model.n_kv_heads=4", "model.max_seq_len=256", "train.seq_len=256", "train.micro_batch_size=8",
            "train.global_batch_size=16", "train.device=cuda", "optim.warmup_steps=2", *extra]


@pytest.mark.parametrize("recipe", available_recipes())
def test_single_gpu_training_every_recipe(recipe, tmp_path):
    text = write_text(tmp_path / "text.txt")
    proc = subprocess.run([sys.executable, "-m", "megadeep", "train", *tiny(text, "train.steps=6", "train.precision=bf16",
                           f"deepspeed.config={recipe}", f"deepspeed.nvme_path={tmp_path / 'nvme'}")],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    head = re.search(r"optimizer (.+?) \| device (\S+)", proc.stdout)
    print(f"{recipe}: {head.group(0) if head else proc.stdout[-500:]}")
    assert head and head.group(1) == expected_adam(recipe) and head.group(2) == "cuda:0"


def test_bf16_tracks_the_fp32_loss_curve(tmp_path):
    from megadeep.config import load_config, resolve
    from megadeep.training.trainer import train

    text = write_text(tmp_path / "text.txt")
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve(load_config(None, tiny(text, "train.steps=40", f"train.precision={precision}",
                                             "log.progress=false")), 1)
        curves[precision] = [r.loss for r in train(cfg).history]
    worst = max(abs(b - f) / f for f, b in zip(curves["fp32"], curves["bf16"]))
    print(f"bf16 vs fp32 loss, worst relative gap over 40 steps: {worst:.4f} (tolerance {BF16_TOLERANCE})")
    assert curves["fp32"][-1] < curves["fp32"][0] - 0.5 and worst < BF16_TOLERANCE


def test_attention_runs_flash_sdpa():
    """The model's attention under a flash-only SDPA: if the shapes, dtype or GPU do not allow the flash
    kernel, torch raises instead of silently falling back to the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megadeep.config.schema import ModelConfig
    from megadeep.model.llama import Attention

    cfg = ModelConfig(dim=1024, n_heads=16, n_kv_heads=4)
    attn = Attention(cfg, False, 0.02, 0.02, 0.02).to("cuda", torch.bfloat16)
    x = torch.randn(2, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        attn(x).float().square().mean().backward()
    print(f"attention backend: flash SDPA on {torch.cuda.get_device_name()}")
    assert x.grad is not None and torch.isfinite(x.grad).all()
