"""The step's overhead beyond the model: the global-norm sum without fp64 gradient copies, RoPE tables
built once and sliced, and DeepSpeed's gradient all-reduce skipped where it is an identity (DP=1, no
ZeRO). That the trained numbers stay the same across layouts is tests/test_layout_parity.py's job."""
import types

import pytest
import torch

from megadeep.model.llama import cached_rope_tables, rope_tables
from megadeep.training.grad_norm import ClipByGlobalNorm, sum_of_squares
from megadeep.training.trainer import skip_identity_allreduce


def test_sum_of_squares_matches_fp64_and_does_not_depend_on_sharding():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, 70, generator=gen) * 10 ** k for k in range(-3, 3)]
    exact = sum(g.double().pow(2).sum() for g in grads)
    got = sum_of_squares(grads)
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    assert abs(got / exact - 1) < 1e-6
    shards = [piece for g in grads for piece in g.chunk(4, dim=1)]  # as TP=4 would hold them
    assert abs(sum_of_squares(shards) / got - 1) < 1e-6
    assert sum_of_squares([]) == 0
    assert not torch.isfinite(sum_of_squares(grads + [torch.tensor([float("inf")])]))  # overflow is seen


@pytest.mark.parametrize("fused", [True, False])
def test_clipping_equals_torchs_clip_grad_norm(fused):
    """The hook (the coefficient inside fused AdamW's step, or a multiply otherwise) trains as torch's
    clip_grad_norm_ + the same optimizer: clipped steps, an unclipped one, and the scale not left behind."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(40, 30, generator=gen), torch.randn(30, generator=gen)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = torch.optim.AdamW(ours, lr=0.1, fused=fused, foreach=None if fused else True)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, fused=fused, foreach=None if fused else True)
    clip = ClipByGlobalNorm(opt, ours, max_norm=1.0)
    assert clip.in_step == fused
    for size in (30.0, 5.0, 0.01, 3.0):  # 0.01: below max_norm, nothing to clip
        grads = [torch.randn(t.shape, generator=gen) * size / 30 for t in init]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt.step()
        ref_opt.step()
        assert abs(clip.norm - ref_norm.item()) <= 1e-6 * ref_norm.item()
        assert getattr(opt, "grad_scale", None) is None
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)  # left clipped, as torch leaves them
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_rope_tables_are_built_once_and_sliced():
    cos, sin = cached_rope_tables(16, 64, 32, 10000.0, "cpu", torch.float32)
    again, _ = cached_rope_tables(64, 64, 32, 10000.0, "cpu", torch.float32)
    assert cos.shape == (16, 32) and again.shape == (64, 32)
    assert cos.data_ptr() == again.data_ptr()  # one table: no rebuild per layer or per step
    ref_cos, ref_sin = rope_tables(64, 32, 10000.0, "cpu")
    assert torch.equal(again, ref_cos) and torch.equal(sin, ref_sin[:16])
    longer, _ = cached_rope_tables(80, 64, 32, 10000.0, "cpu", torch.float32)  # past max_seq_len: its own table
    assert longer.shape == (80, 32) and torch.equal(longer, rope_tables(80, 32, 10000.0, "cpu")[0])


def fake_engine(stage: int, wrapped: bool, pipeline: bool = False, moe: bool = False):
    opt = types.SimpleNamespace(**({"set_gradient_accumulation_boundary": lambda b: None} if wrapped else {}))
    engine = types.SimpleNamespace(optimizer=opt, zero_optimization_stage=lambda: stage, has_moe_layers=moe,
                                   enable_backward_allreduce=True)
    if pipeline:
        engine.pipeline_enable_backward_allreduce = True
    return engine


@pytest.mark.parametrize("dp,stage,wrapped,moe,skipped", [
    (1, 0, False, False, True),
    (2, 0, False, False, False),  # a real reduction
    (1, 1, False, False, False),  # ZeRO moves gradients into its partitions there
    (1, 0, True, False, False),  # fp16/bf16 wrappers too
    (1, 0, False, True, False),  # expert gradients reduce over their own groups
])
def test_identity_allreduce_skipped_only_at_dp1_without_zero(dp, stage, wrapped, moe, skipped):
    for pipeline in (False, True):
        engine = fake_engine(stage, wrapped, pipeline, moe)
        assert skip_identity_allreduce(engine, dp) == skipped
        assert engine.enable_backward_allreduce == (not skipped)
        if pipeline:
            assert engine.pipeline_enable_backward_allreduce == (not skipped)
