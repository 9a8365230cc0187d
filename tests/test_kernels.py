"""megadeep's csrc kernels (RMSNorm, SwiGLU, RoPE): forward and backward against float64 references,
gradcheck through the fp64 kernels, bf16 within bf16 tolerance, deterministic dw, input checks, the plain-PyTorch fallback,
the CUDA sources compiling for sm_80/sm_90, and the fused model training like the unfused one.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings

import pytest
import torch
import torch.nn.functional as F

from megadeep import ops
from megadeep.ops import fused
from tests.helpers import ROOT, WORKERS, read_json, rel_err, write_text

EPS = 1e-5
# (rows shape, hidden): one row, odd and vector-unaligned sizes, more rows than dw blocks (64 on CPU).
SHAPES = [((1,), 1), ((1,), 4099), ((3,), 7), ((2, 5), 33), ((37,), 129), ((517,), 64), ((4, 130), 24)]


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = fused.load()
    assert ok, f"the csrc kernels must be built for these tests: {why}"


def rms_ref(x, w):
    x, w = x.double(), w.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def swiglu_ref(gate_up):
    gate, up = gate_up.double().chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_ref(x, cos, sin):
    x, cos, sin = x.double(), cos.double(), sin.double()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_case(b, s, h, d, per_batch, g, dtype=torch.float32):
    """q as the model sees it (a strided view of a fused qkv output) and tables shaped as rope_at makes
    them: [s, 1, d], or [b, s, 1, d] with per-document positions. cos and sin halves differ on purpose
    (scaled tables keep them equal; the kernel must not rely on it)."""
    qkv = torch.randn(b, s, 3 * h * d + 2, generator=g)
    x = qkv[..., 1:1 + h * d].unflatten(-1, (h, d))
    shape = (b, s, 1, d) if per_batch else (s, 1, d)
    cos, sin = torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1
    return x.to(dtype), cos.to(dtype), sin.to(dtype), torch.randn(b, s, h, d, generator=g).to(dtype)


def grads(fn, *inputs, dout):
    """Output and input gradients of fn at `inputs` (each a fresh leaf) for upstream gradient dout."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_rms_norm_fp32_matches_float64(rows, hidden):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(*rows, hidden, generator=g) * 3
    w = torch.randn(hidden, generator=g)
    dy = torch.randn(*rows, hidden, generator=g)
    y, (dx, dw) = grads(lambda a, b: ops.rms_norm(a, b, EPS, fused=True), x, w, dout=dy)
    y_ref, (dx_ref, dw_ref) = grads(rms_ref, x.double(), w.double(), dout=dy.double())
    assert y.dtype == dx.dtype == dw.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-6
    # dx is a difference of two terms that cancel exactly for hidden=1: measure against the first term.
    term = (dy.double() * w.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS)).abs().max()
    assert (dx - dx_ref).abs().max() < 1e-5 * term
    assert rel_err(dw, dw_ref) < 1e-5


@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_swiglu_fp32_matches_float64(rows, hidden):
    g = torch.Generator().manual_seed(hidden)
    gate_up = torch.randn(*rows, 2 * hidden, generator=g) * 4
    dout = torch.randn(*rows, hidden, generator=g)
    out, (d,) = grads(lambda t: ops.swiglu(t, fused=True), gate_up, dout=dout)
    out_ref, (d_ref,) = grads(swiglu_ref, gate_up.double(), dout=dout.double())
    assert out.shape == (*rows, hidden) and d.shape == gate_up.shape
    assert rel_err(out, out_ref) < 1e-6
    assert rel_err(d, d_ref) < 1e-6


@pytest.mark.parametrize("b,s,h,d", [(1, 1, 1, 2), (2, 5, 3, 10), (3, 7, 2, 64), (1, 4, 5, 66)])
@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_fp32_matches_float64(b, s, h, d, per_batch):
    g = torch.Generator().manual_seed(d)
    x, cos, sin, dy = rope_case(b, s, h, d, per_batch, g)
    assert b * s * h == 1 or not x.is_contiguous()
    y, (dx,) = grads(lambda t: ops.rope(t, cos, sin, fused=True), x, dout=dy)
    y_ref, (dx_ref,) = grads(lambda t: rope_ref(t, cos, sin), x.double(), dout=dy.double())
    assert y.dtype == dx.dtype == torch.float32 and y.is_contiguous()
    assert rel_err(y, y_ref) < 1e-6 and rel_err(dx, dx_ref) < 1e-6
    assert type(ops.rope(x.requires_grad_(), cos, sin, fused=True).grad_fn).__name__ == "RopeFunctionBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gradient_in_place(dtype):
    """grad_in_place gives the same gradient, written over the intermediate gate_up; misuse is refused."""
    g = torch.Generator().manual_seed(4)
    leaf = torch.randn(37, 2 * 131, generator=g).to(dtype).requires_grad_()  # vector body + scalar tail
    dout = torch.randn(37, 131, generator=g).to(dtype)
    out, (want,) = grads(lambda t: ops.swiglu(t, fused=True), leaf, dout=dout)
    for make in (lambda: leaf * 1, lambda: (leaf.t() * 1).t()):
        leaf.grad = None
        gate_up = make()  # an intermediate, contiguous or not
        got = ops.swiglu(gate_up, fused=True, grad_in_place=True)
        got.backward(dout)
        assert torch.equal(got, out) and torch.equal(leaf.grad, want)
        if gate_up.is_contiguous():
            assert torch.equal(gate_up.detach(), want)  # its memory now holds the gradient
    gate_up = leaf * 1
    got = ops.swiglu(gate_up, fused=True, grad_in_place=True)
    got.backward(dout, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        got.backward(dout)
    with pytest.raises(ValueError, match="overwrite a leaf"):
        ops.swiglu(leaf, fused=True, grad_in_place=True)


def test_gradcheck_through_the_fp64_kernels():
    """gradcheck in float64 runs the kernels' fp64 instantiation (the same template as fp32/bf16)."""
    g = torch.Generator().manual_seed(0)
    for hidden in (5, 8, 13):
        x = torch.randn(3, hidden, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(hidden, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: fused.RMSNormFunction.apply(a, b, EPS), (x, w))
        gu = torch.randn(2, 3, 2 * hidden, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(fused.SwiGLUFunction.apply, (gu,))
    x, cos, sin, _ = rope_case(2, 3, 2, 6, True, g, torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.rope(t, cos, sin, fused=True), (x.requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_within_its_tolerance(dtype):
    """Storage in bf16/fp16, math in fp32: errors of a few units in the last place of the storage type."""
    g = torch.Generator().manual_seed(1)
    ulp = torch.finfo(dtype).eps
    x, w, dy = torch.randn(6, 40, generator=g), torch.randn(40, generator=g), torch.randn(6, 40, generator=g)
    x, w, dy = x.to(dtype), w.to(dtype), dy.to(dtype)
    y, (dx, dw) = grads(lambda a, b: ops.rms_norm(a, b, EPS, fused=True), x, w, dout=dy)
    y_ref, (dx_ref, dw_ref) = grads(rms_ref, x, w, dout=dy.double())
    assert y.dtype == dx.dtype == dw.dtype == dtype
    for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert rel_err(got, ref) < 4 * ulp
    gate_up, dout = torch.randn(6, 2 * 40, generator=g).to(dtype), torch.randn(6, 40, generator=g).to(dtype)
    out, (d,) = grads(lambda t: ops.swiglu(t, fused=True), gate_up, dout=dout)
    out_ref, (d_ref,) = grads(swiglu_ref, gate_up, dout=dout.double())
    assert out.dtype == d.dtype == dtype
    assert rel_err(out, out_ref) < 4 * ulp and rel_err(d, d_ref) < 4 * ulp
    x, cos, sin, dy = rope_case(2, 6, 3, 40, False, g, dtype)
    y, (dx,) = grads(lambda t: ops.rope(t, cos, sin, fused=True), x, dout=dy)
    y_ref, (dx_ref,) = grads(lambda t: rope_ref(t, cos, sin), x, dout=dy.double())
    assert y.dtype == dx.dtype == dtype
    assert rel_err(y, y_ref) < 4 * ulp and rel_err(dx, dx_ref) < 4 * ulp


def test_fp32_weight_with_bf16_activations():
    """A bf16 x with an fp32 weight (mixed precision) gives an fp32 weight gradient, like plain PyTorch."""
    x, w = torch.randn(4, 16).bfloat16(), torch.randn(16)
    y, (_, dw) = grads(lambda a, b: ops.rms_norm(a, b, EPS, fused=True), x, w, dout=torch.ones(4, 16))
    y_eager, (_, dw_eager) = grads(lambda a, b: ops.rms_norm(a, b, EPS), x, w, dout=torch.ones(4, 16))
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert rel_err(y, y_eager) < 2 * torch.finfo(torch.bfloat16).eps
    assert rel_err(dw, dw_eager) < 1e-5


def test_non_contiguous_inputs_are_made_contiguous():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 2 * 24 + 3, generator=g)
    x = base[:, 1:25].t()  # transposed slice: [24, 40]
    w = torch.randn(40, generator=g)
    dy = torch.randn(40, 24, generator=g).t()
    y, (dx, dw) = grads(lambda a, b: ops.rms_norm(a, b, EPS, fused=True), x, w, dout=dy)
    y_ref, (dx_ref, dw_ref) = grads(rms_ref, x.double(), w.double(), dout=dy.double())
    assert not x.is_contiguous() and rel_err(y, y_ref) < 1e-6 and rel_err(dx, dx_ref) < 1e-5
    assert rel_err(dw, dw_ref) < 1e-5
    gate_up = base[:, 1:49]  # rows with a stride wider than the row
    dout = torch.randn(24, 40, generator=g).t()
    out, (d,) = grads(lambda t: ops.swiglu(t, fused=True), gate_up, dout=dout)
    out_ref, (d_ref,) = grads(swiglu_ref, gate_up.double(), dout=dout.double())
    assert not gate_up.is_contiguous() and rel_err(out, out_ref) < 1e-6 and rel_err(d, d_ref) < 1e-6


def test_ops_refuse_bad_inputs_clearly():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.megadeep.rms_norm_fwd(x.t().contiguous().t(), w, EPS)
    with pytest.raises(RuntimeError, match=r"weight has shape \[7\] but x has hidden size 8"):
        torch.ops.megadeep.rms_norm_fwd(x, torch.randn(7), EPS)
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.megadeep.swiglu_fwd(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="gate_up must be contiguous"):
        torch.ops.megadeep.swiglu_fwd(torch.randn(8, 4).t())
    _, rstd = torch.ops.megadeep.rms_norm_fwd(x, w, EPS)
    with pytest.raises(RuntimeError, match="gradient is"):
        torch.ops.megadeep.rms_norm_bwd(torch.randn(4, 9), x, w, rstd)
    q, table = torch.randn(2, 3, 4, 8), torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        torch.ops.megadeep.rope(torch.randn(2, 3, 4, 7), torch.randn(1, 3, 7), torch.randn(1, 3, 7), False)
    with pytest.raises(RuntimeError, match=r"cos and sin must be \[1 or batch, seq, head_dim\]"):
        torch.ops.megadeep.rope(q, torch.randn(1, 4, 8), torch.randn(1, 4, 8), False)
    with pytest.raises(RuntimeError, match="unit stride along head_dim"):
        torch.ops.megadeep.rope(q.transpose(2, 3).contiguous().transpose(2, 3), table, table, False)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        torch.ops.megadeep.rope(q, table.double(), table.double(), False)


def test_dw_is_the_same_for_any_thread_count():
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(1000, 96, generator=g), torch.randn(96, generator=g), torch.randn(1000, 96, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            _, rstd = torch.ops.megadeep.rms_norm_fwd(x, w, EPS)
            results.append(torch.ops.megadeep.rms_norm_bwd(dy, x, w, rstd)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


def test_fake_kernels_match_the_real_ones():
    """The shapes torch.compile traces with (register_fake) are the kernels' own."""
    x, w, gu = torch.randn(3, 2, 8), torch.randn(8), torch.randn(5, 12)
    _, rstd = torch.ops.megadeep.rms_norm_fwd(x, w, EPS)
    for op, args in [
        (torch.ops.megadeep.rms_norm_fwd.default, (x, w, EPS)),
        (torch.ops.megadeep.rms_norm_bwd.default, (torch.randn_like(x), x, w, rstd)),
        (torch.ops.megadeep.swiglu_fwd.default, (gu,)),
        (torch.ops.megadeep.swiglu_bwd.default, (torch.randn(5, 6), gu)),
        (torch.ops.megadeep.swiglu_bwd_.default, (torch.randn(5, 6), gu.clone())),
        (torch.ops.megadeep.rope.default,
         (torch.randn(2, 3, 4, 8)[:, :, 1:], torch.randn(1, 3, 8), torch.randn(1, 3, 8), True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_fallback_is_said_once_and_on_requires_the_build(monkeypatch):
    monkeypatch.setattr(fused, "load", lambda: (False, "megadeep._C is not built (test)"))
    ops._say_fallback.cache_clear()
    with pytest.raises(RuntimeError, match=r"fused_kernels=on .*not built \(test\).*pip install"):
        ops.use_fused("on")
    with pytest.warns(RuntimeWarning, match="not built.*plain PyTorch"):
        assert ops.use_fused("auto") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.use_fused("auto") is False  # said once
        assert ops.use_fused("off") is False
    ops._say_fallback.cache_clear()


def test_fused_on_without_a_build_is_refused_before_launch(monkeypatch):
    from megadeep.config import load_config, resolve, validate
    from megadeep.errors import ConfigError

    cfg = load_config(None, ["model.fused_kernels=on", "data.corpus=shakespeare"])
    resolve(cfg, 1)
    monkeypatch.setattr(validate, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="fused_kernels=on but megadeep's csrc kernels are not built"):
        resolve(cfg, 1)


def test_unsupported_dtype_falls_back_to_pytorch():
    ops._say_fallback.cache_clear()
    x = torch.randn(2, 4, dtype=torch.complex64)
    with pytest.warns(RuntimeWarning, match="no fused kernel for torch.complex64"):
        ops.swiglu(x, fused=True)
    ops._say_fallback.cache_clear()


def setup_constant(name: str):
    """A literal module-level constant of setup.py, read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise KeyError(name)


def nvcc_flags(monkeypatch, arch_list: str) -> list[str]:
    """What torch's CUDAExtension passes nvcc (common flags, -gencode per arch) plus setup.py's own."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    arch = cpp_extension._get_cuda_arch_flags()
    return cpp_extension.COMMON_NVCC_FLAGS + ["--compiler-options", "-fPIC"] + setup_constant("NVCC_FLAGS") + arch


def bindings_check(tmp_path) -> list[str]:
    """A syntax check of csrc/cuda/bindings.cpp against torch's headers. A CPU-only torch lacks one
    generated header (c10/cuda/impl/cuda_cmake_macros.h), so an empty one is found last, if at all."""
    from torch.utils import cpp_extension

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    dryrun = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    cuda_include = re.search(r'INCLUDES="-I([^"]+)"', dryrun).group(1).strip()  # where nvcc finds cuda_runtime.h
    return ["c++", "-std=c++20", "-fsyntax-only", "-DMEGADEEP_WITH_CUDA", "-Wall", "-Werror", "-Wno-unknown-pragmas",
            *(f"-isystem{p}" for p in cpp_extension.include_paths()), f"-isystem{cuda_include}",
            f"-isystem{sysconfig.get_paths()['include']}", "-idirafter", str(tmp_path / "stub"),
            str(ROOT / "csrc" / "cuda" / "bindings.cpp")]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed, so the CUDA sources cannot be compiled")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path, monkeypatch):
    """The kernels compile for A100 and H100 as torch would build them; their torch bindings compile too."""
    flags = nvcc_flags(monkeypatch, "8.0;9.0")
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    commands = [["nvcc", "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o"), *flags]
                for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
    assert len(commands) == 3
    commands.append(bindings_check(tmp_path))
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    for command, p in zip(commands, procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{command[0]} {command[-1] if command[0] == 'c++' else command[2]}:\n{out}"


def test_fused_model_trains_like_the_unfused_one(tmp_path):
    """Same weights and data, 10 steps: losses and grad norms agree to 1e-5 (fp32)."""
    text = write_text(tmp_path / "text.txt")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(WORKERS / "parity.py"), str(out), str(text), "fused=off", "fused=on"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    r = read_json(out)
    assert len(r["fused=on"]["loss"]) == 10
    assert rel_err(r["fused=on"]["loss"], r["fused=off"]["loss"]) < 1e-5
    assert rel_err(r["fused=on"]["grad_norm"], r["fused=off"]["grad_norm"]) < 1e-5
    assert r["fused=on"]["loss"][-1] < r["fused=on"]["loss"][0] - 0.5
