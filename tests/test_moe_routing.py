"""MoE routing on planted inputs: capacity drops exactly what an independent count says, dropped slots add
nothing (the residual carries the token), ties go to the lower expert, any top-k."""
import math

import torch

from megadeep.config.schema import ModelConfig, MoEConfig
from megadeep.model.moe import MoEFeedForward, route


def planted_layer(capacity_factor: float, top_k: int = 2) -> MoEFeedForward:
    cfg = ModelConfig(dim=8, n_heads=2, moe=MoEConfig(num_experts=4, top_k=top_k, ffn_dim=16,
                                                       capacity_factor=capacity_factor))
    layer = MoEFeedForward(cfg, False, False, 0.02, 0.02)
    for m in (layer.router, layer.experts):
        m.reset_parameters(5)
    with torch.no_grad():  # expert e's logit is 10·x[e]: a token's features choose its experts
        layer.router.weight.zero_()
        layer.router.weight[:, :4] = 10 * torch.eye(4)
    return layer


def planted_tokens(first: list[int], second: list[int]) -> torch.Tensor:
    x = torch.zeros(1, len(first), 8)
    for t, (a, b) in enumerate(zip(first, second)):
        x[0, t, a], x[0, t, b], x[0, t, 4 + t % 4] = 1.0, 0.5, 1.0  # a gets the most, b the second most
    return x


def independent_dropped(first, second, capacity: int, n_experts: int = 4) -> tuple[int, set]:
    """GShard's priority by hand: all first choices in token order, then all second choices."""
    used, dropped = [0] * n_experts, set()
    for slot, choices in enumerate((first, second)):
        for t, e in enumerate(choices):
            if used[e] < capacity:
                used[e] += 1
            else:
                dropped.add((t, slot))
    return len(dropped), dropped


def test_dropped_fraction_matches_an_independent_count():
    first = [0, 0, 0, 0, 0, 1, 1, 2, 0, 3, 0, 0]  # expert 0 is wanted by most tokens
    second = [1, 2, 1, 3, 2, 0, 2, 0, 1, 0, 3, 1]
    for cf in (0.5, 1.0, 1.5):
        layer = planted_layer(cf)
        x = planted_tokens(first, second)
        y = layer(x)
        capacity = math.ceil(cf * len(first) * 2 / 4)
        n_dropped, dropped = independent_dropped(first, second, capacity)
        assert n_dropped > 0, cf  # the plant really overloads expert 0
        assert abs(layer.stats["dropped"].item() - n_dropped / (2 * len(first))) < 1e-7, (cf, layer.stats, n_dropped)
        # each token's output is the dropless one without its dropped slots
        r = route(layer.router(x[0]), 2, 0.0)
        assert r.experts[:, 0].tolist() == first and r.experts[:, 1].tolist() == second
        for t in range(len(first)):
            expect = torch.zeros(8)
            for slot in range(2):
                if (t, slot) not in dropped:
                    e = first[t] if slot == 0 else second[t]
                    h = x[0, t] @ layer.experts.w13[e].t()
                    g, u = h.chunk(2)
                    expect += r.weights[t, slot] * (torch.nn.functional.silu(g) * u) @ layer.experts.w2[e].t()
            torch.testing.assert_close(y[0, t], expect, rtol=1e-5, atol=1e-6)
    # a token whose every slot is dropped contributes nothing: the block's residual alone carries it
    layer = planted_layer(0.25, top_k=1)  # capacity 1 per expert for 4 tokens
    y = layer(planted_tokens([2, 2, 2, 1], [0, 0, 0, 0]))
    assert torch.all(y[0, 1:3] == 0) and y[0, 0].abs().sum() > 0
    assert abs(layer.stats["dropped"].item() - 0.5) < 1e-7


def test_dropless_drops_nothing_and_ties_go_to_the_lower_expert():
    layer = planted_layer(0.0)
    layer(planted_tokens([0] * 8, [1] * 8))
    assert layer.stats["dropped"].item() == 0.0
    logits = torch.zeros(3, 4)  # all tied
    logits[1, 3] = logits[1, 2] = 1.0  # two tied winners
    r = route(logits, 3, 0.0)
    assert r.experts.tolist() == [[0, 1, 2], [2, 3, 0], [0, 1, 2]]
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(3))


def test_router_losses_get_their_gradient_through_the_layer_output():
    """Backward of the LM loss alone gives the gradient of LM loss + the coefficients' share of every
    MoE layer's router losses (computed here directly from each layer's input), all parameters."""
    from megadeep.model import Transformer
    from megadeep.model.moe import balance_loss, moe_layers, set_loss_scale

    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, ffn_dim=32, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=8, every=1, aux_loss_coef=0.3, z_loss_coef=0.2))
    model = Transformer(cfg)
    model.init_weights(seed=3)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = []
    hooks = [f.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0]))) for f in moe_layers(model)]

    def grads(scale: float, explicit: bool):
        inputs.clear()
        model.zero_grad()
        set_loss_scale(model, scale)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        if explicit:
            for f, x in inputs:
                r = route(f.router(x.reshape(-1, 16)), 2, 0.0)
                z = torch.logsumexp(r.logits, dim=-1).pow(2).mean()
                loss = loss + (0.3 * balance_loss(r, 4)[0] + 0.2 * z) / len(inputs)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    injected, explicit = grads(1.0, False), grads(0.0, True)
    for h in hooks:
        h.remove()
    assert injected["layers.1.feed_forward.router.weight"].abs().sum() > 0
    for n in injected:
        torch.testing.assert_close(injected[n], explicit[n], rtol=1e-5, atol=1e-7, msg=n)
    without = grads(0.0, False)  # the router losses do change the router's gradient
    assert not torch.allclose(without["layers.1.feed_forward.router.weight"], injected["layers.1.feed_forward.router.weight"])
