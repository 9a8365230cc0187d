"""Single-process model checks: shapes, GQA, deep-model options, activation checkpointing with dropout."""
import math

import pytest
import torch

from megadeep.config.schema import ModelConfig
from megadeep.model import Transformer, num_params
from megadeep.parallel.random import get_rng_tracker, seed_everything

SMALL = dict(vocab_size=50, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16, vocab_pad_unit=8)


def test_logits_shape_padding_and_param_count():
    cfg = ModelConfig(**SMALL, tie_embeddings=False)
    m = Transformer(cfg)
    m.init_weights(0)
    x = torch.randint(0, 50, (2, 16))
    assert m(x).shape == (2, 16, 56)  # vocab padded to a multiple of 8
    real = sum(p.numel() for p in m.parameters()) - 2 * 6 * 32  # minus padded rows (embedding + head)
    assert real == num_params(cfg)
    loss = m(x, x)
    assert abs(loss.item() - math.log(50)) < 0.5


def test_padded_vocab_never_wins_or_learns():
    m = Transformer(ModelConfig(**SMALL))
    m.init_weights(0)
    with torch.no_grad():
        m.tok_embeddings.weight[50:] = 5.0  # even huge padded rows must not matter
    x = torch.randint(0, 50, (2, 16))
    loss = m(x, x)
    loss.backward()
    assert torch.all(m.tok_embeddings.weight.grad[50:] == 0)


@pytest.mark.parametrize("overwrite", [False, True])
def test_single_shard_cross_entropy_matches_torch(overwrite):
    """TP=1 without padding takes the fused single-shard path (with ``overwrite``: in the logits' own
    buffer): loss and gradients equal F.cross_entropy's (ignore_index rows included), and a second
    backward through it is refused, not silently wrong."""
    from megadeep.parallel.cross_entropy import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 7, 8, generator=g), torch.randn(40, 8, generator=g)
    target = torch.randint(0, 40, (3, 7), generator=g)
    target[:, ::3] = -100
    grad_out = torch.rand(3, 7, generator=g)
    ref_w, got_w = w.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h @ ref_w.T).flatten(0, 1), target.flatten(), reduction="none")
    (ref.view(3, 7) * grad_out).sum().backward()
    got = vocab_parallel_cross_entropy(h @ got_w.T, target, 40, overwrite=overwrite)
    (got * grad_out).sum().backward(retain_graph=True)
    torch.testing.assert_close(got, ref.view(3, 7), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_w.grad, ref_w.grad, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (got * grad_out).sum().backward()


def test_residual_scaling_and_deepnorm_inits():
    scaled = Transformer(ModelConfig(**SMALL, residual_scaling=True))
    plain = Transformer(ModelConfig(**SMALL, residual_scaling=False))
    deep = Transformer(ModelConfig(**SMALL, residual_scaling=False, deepnorm=True))
    for m in (scaled, plain, deep):
        m.init_weights(0)
    ratio = (scaled.layers[0].attention.wo.weight.std() / plain.layers[0].attention.wo.weight.std()).item()
    assert ratio == pytest.approx(1 / math.sqrt(2 * 3), rel=0.1)
    assert deep.layers[0].alpha == pytest.approx((2 * 3) ** 0.25)
    beta = (8 * 3) ** -0.25
    assert deep.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(beta * math.sqrt(2 / (64 + 32)), rel=0.1)
    x = torch.randint(0, 50, (2, 16))
    assert torch.isfinite(deep(x, x))


@pytest.mark.parametrize("attention_dropout", [0.0, 0.2])
def test_activation_checkpointing_replays_dropout(attention_dropout):
    """Recomputation must draw the same dropout masks, in the default and the tracked TP stream."""
    grads = []
    for ckpt in (False, True):
        cfg = ModelConfig(**SMALL, dropout=0.1, attention_dropout=attention_dropout, activation_checkpointing=ckpt)
        m = Transformer(cfg)
        m.init_weights(0)
        seed_everything(5, "cpu")
        x = torch.randint(0, 50, (2, 16))
        m(x, x).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        assert "tensor-parallel" in get_rng_tracker().states
    assert torch.equal(grads[0], grads[1])
