"""MoE in the one accounting: per-rank parameter tensors of the built model at every (TP, EP), MFU's
active parameters, and ``megadeep memory``'s measured model states per rank against the formula
(experts ZeRO-partitioned over the expert-data-parallel ranks)."""
import dataclasses

import pytest
import torch

from megadeep.config.schema import ModelConfig, MoEConfig
from megadeep.model import Transformer, accounting, num_params
from megadeep.parallel import groups
from megadeep.parallel.layout import Layout
from megadeep.pipeline import partition
from tests.helpers import write_text
from tests.test_ds_configs import memory_on_4_ranks

MOE = ModelConfig(vocab_size=1000, dim=64, n_layers=3, n_heads=8, n_kv_heads=4, ffn_dim=160, vocab_pad_unit=8,
                  moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=48, every=2, shared_experts=1))


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)])
def test_rank_tensors_are_the_built_models(tp, ep):
    with groups.simulate(Layout(tp=tp, dp=4, ep=ep), rank=tp * (ep - 1)), torch.device("meta"):
        model = Transformer(MOE)
        built = sorted(p.numel() for p in model.parameters())
    assert sorted(partition.stage_param_numels(MOE, tp, 1, ep=ep)[0]) == built
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert accounting.expert_param_numel(MOE, tp, ep) == experts
    if tp == ep == 1:
        assert num_params(MOE) == sum(built) - (MOE.padded_vocab(1) - MOE.vocab_size) * MOE.dim


def test_mfu_counts_active_parameters():
    """An MoE model's FLOPs per token are a dense model's whose FFN is the top-k experts' width, plus
    the router's matmul; its parameter count has all experts."""
    moe = dataclasses.replace(MOE, moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=48))
    dense = dataclasses.replace(MOE, moe=MoEConfig(), ffn_dim=2 * 48)
    router = moe.n_layers * 8 * moe.dim
    assert accounting.active_params(moe) == num_params(dense) + router
    assert accounting.flops_per_token(moe, 128) == accounting.flops_per_token(dense, 128) + 6 * router
    assert num_params(moe) == num_params(dense) + router + moe.n_layers * 6 * 3 * 48 * moe.dim


def test_memory_per_rank_matches_the_formula(tmp_path):
    text = write_text(tmp_path / "text.txt")
    moe = "model.moe.num_experts=8,model.moe.top_k=2,model.moe.ffn_dim=256,train.steps=2"
    specs = [f"{moe},parallel.ep=2,deepspeed.config=zero{s}" for s in (0, 1, 2)] + [f"{moe},parallel.ep=4,deepspeed.config=zero2"]
    results = memory_on_4_ranks(text, tmp_path, specs)
    # EP=4 holds half the experts EP=2 does
    ep2, ep4 = (results[s]["memory"][0]["params"] for s in (specs[2], specs[3]))
    assert ep4 < ep2
