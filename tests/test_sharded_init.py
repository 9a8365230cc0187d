"""Sharded construction: each rank's shard, built on the meta device and initialised in place, equals the
same slice of the single-process model (fused QKV / gate-up blocks and vocab padding included), with
only the shard's elements generated (counter-based RNG)."""
import pytest
import torch

from megadeep.config.schema import ModelConfig
from megadeep.model.llama import Transformer, materialize
from megadeep.parallel import counter_rng, groups
from megadeep.parallel.layout import Layout
from megadeep.parallel.sharding import shard

CFG = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=96, vocab_pad_unit=8,
                  tie_embeddings=False)


def built(layout: Layout, rank: int) -> dict[str, torch.Tensor]:
    with groups.simulate(layout, rank):
        with torch.device("meta"):
            model = Transformer(CFG)
        materialize(model, {"": model}, torch.device("cpu"), seed=11)
        return {n: p for n, p in model.named_parameters()}


def test_counter_rng_slices_and_statistics():
    idx = torch.arange(1 << 20)
    z = counter_rng.normal(42, idx)
    assert torch.equal(counter_rng.normal(42, idx[5000:7000]), z[5000:7000])
    assert torch.equal(counter_rng.normal(42, idx.flip(0)), z.flip(0))
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3
    assert not torch.equal(counter_rng.normal(43, idx[:100]), z[:100])


@pytest.mark.parametrize("tp", [2, 4])
def test_every_tp_shard_is_the_slice_of_the_single_process_weight(tp):
    full = built(Layout(), 0)
    for rank in range(tp):
        for name, p in built(Layout(tp=tp), rank).items():
            ref = full[name].detach()
            if p.partition_dim is not None and ref.shape[p.partition_dim] != p.shape[p.partition_dim] * tp:
                pad = p.shape[p.partition_dim] * tp - ref.shape[0]  # vocab padding grows with TP
                ref = torch.cat([ref, ref.new_zeros(pad, *ref.shape[1:])])
            assert torch.equal(p.detach(), shard(ref, p.partition_dim, rank, tp, p.partition_blocks)), (tp, rank, name)


def test_initial_statistics_follow_the_config():
    p = built(Layout(), 0)
    std = p["layers.0.feed_forward.w13.weight"].std().item()
    assert std == pytest.approx(CFG.init_std, rel=0.05)
    assert torch.all(p["tok_embeddings.embedding.weight"][CFG.vocab_size:] == 0)
    assert torch.all(p["layers.1.attention_norm.weight"] == 1)
