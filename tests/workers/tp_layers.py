"""Tensor-parallel layers vs dense references, on every rank: outputs and all gradients.

Run under torchrun with W ranks (TP = W). Writes {check: max relative error over ranks} to argv[1].
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megadeep.config.schema import ModelConfig
from megadeep.model.llama import Block, RMSNorm, Transformer
from megadeep.monitoring.comm import min_tp_bytes_per_layer
from megadeep.parallel import groups
from megadeep.parallel.comm import SEQ_DIM
from megadeep.parallel.cross_entropy import vocab_parallel_cross_entropy
from megadeep.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megadeep.parallel.layout import Layout
from megadeep.parallel.random import get_rng_tracker, seed_everything
from megadeep.parallel.sharding import shard

torch.set_default_dtype(torch.float32)
dist.init_process_group("gloo")
W, R = dist.get_world_size(), dist.get_rank()
groups.initialize(Layout(tp=W))
errors: dict[str, float] = {}


def err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def check(name, a, b):
    e = torch.tensor(err(a, b), dtype=torch.float64)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    errors[name] = max(errors.get(name, 0.0), e.item())


def sl(t, dim, blocks=None):
    if dim == 2 and blocks:  # an activation laid out like a blocked weight's rows
        return shard(t.transpose(0, 2), 0, R, W, blocks).transpose(0, 2)
    return shard(t, dim, R, W, blocks)


def seq_slice(t):
    return t.chunk(W, SEQ_DIM)[R]


g = torch.Generator().manual_seed(0)
B, S, IN, OUT = 2, 4 * W, 12, 8 * W


def rand(*shape):
    return torch.randn(*shape, generator=g)


# ---- column parallel, with and without gather_output and blocks ----
QKV = (OUT // 2, OUT // 4, OUT // 4)
for gather, blocks, sp in [(False, None, False), (True, None, False), (False, QKV, False), (False, None, True),
                           (False, (OUT // 2, OUT // 2), True)]:
    name = f"column gather={gather} blocks={blocks} sp={sp}"
    w, b, x, G = rand(OUT, IN), rand(OUT), rand(B, S, IN), rand(B, S, OUT)
    xd = x.clone().requires_grad_()
    wd, bd = w.clone().requires_grad_(), b.clone().requires_grad_()
    yd = F.linear(xd, wd, bd)
    (yd * G).sum().backward()

    layer = ColumnParallelLinear(IN, OUT, bias=True, gather_output=gather, blocks=blocks, sequence_parallel=sp)
    with torch.no_grad():
        layer.weight.copy_(sl(w, 0, blocks))
        layer.bias.copy_(sl(b, 0, blocks))
    xp = (seq_slice(x) if sp else x).clone().requires_grad_()
    y = layer(xp)
    Gp = G if gather else sl(G, 2, blocks)
    ref_y = yd.detach() if gather else sl(yd.detach(), 2, blocks)
    (y * Gp).sum().backward()
    check(name + " out", y, ref_y)
    check(name + " dx", xp.grad, seq_slice(xd.grad) if sp else xd.grad)
    check(name + " dw", layer.weight.grad, sl(wd.grad, 0, blocks))
    check(name + " db", layer.bias.grad, sl(bd.grad, 0, blocks))

# ---- row parallel ----
for parallel_in, sp in [(True, False), (False, False), (True, True)]:
    name = f"row input_is_parallel={parallel_in} sp={sp}"
    w, b, x, G = rand(OUT, IN * W), rand(OUT), rand(B, S, IN * W), rand(B, S, OUT)
    xd, wd, bd = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    yd = F.linear(xd, wd, bd)
    (yd * G).sum().backward()

    layer = RowParallelLinear(IN * W, OUT, bias=True, input_is_parallel=parallel_in, sequence_parallel=sp)
    with torch.no_grad():
        layer.weight.copy_(sl(w, 1))
        layer.bias.copy_(b)
    xp = (sl(x, 2) if parallel_in else x).clone().requires_grad_()
    y = layer(xp)
    (y * (seq_slice(G) if sp else G)).sum().backward()
    check(name + " out", y, seq_slice(yd.detach()) if sp else yd.detach())
    check(name + " dx", xp.grad, sl(xd.grad, 2) if parallel_in else xd.grad)
    check(name + " dw", layer.weight.grad, sl(wd.grad, 1))
    check(name + " db", layer.bias.grad, bd.grad)

# ---- an MLP with sequence parallel end to end: norm → column → gelu → row ----
for sp in (False, True):
    name = f"mlp sp={sp}"
    w1, w2, nw, x, G = rand(OUT, IN), rand(IN, OUT), rand(IN), rand(B, S, IN), rand(B, S, IN)
    xd, w1d, w2d, nwd = (t.clone().requires_grad_() for t in (x, w1, w2, nw))
    hd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nwd
    yd = F.linear(F.gelu(F.linear(hd, w1d)), w2d)
    (yd * G).sum().backward()

    norm = RMSNorm(IN, 1e-5, sequence_parallel=sp)
    c = ColumnParallelLinear(IN, OUT, sequence_parallel=sp)
    r = RowParallelLinear(OUT, IN, sequence_parallel=sp)
    with torch.no_grad():
        norm.weight.copy_(nw)
        c.weight.copy_(sl(w1, 0))
        r.weight.copy_(sl(w2, 1))
    xp = (seq_slice(x) if sp else x).clone().requires_grad_()
    y = r(F.gelu(c(norm(xp))))
    (y * (seq_slice(G) if sp else G)).sum().backward()
    check(name + " out", y, seq_slice(yd.detach()) if sp else yd.detach())
    check(name + " dx", xp.grad, seq_slice(xd.grad) if sp else xd.grad)
    check(name + " d norm weight", norm.weight.grad, nwd.grad)
    check(name + " dw1", c.weight.grad, sl(w1d.grad, 0))
    check(name + " dw2", r.weight.grad, sl(w2d.grad, 1))

# ---- vocab-parallel embedding (vocab not divisible by TP: padded) ----
V, D = 37, 6
padded = 8 * W * ((V + 8 * W - 1) // (8 * W))
for sp in (False, True):
    name = f"embedding sp={sp}"
    w = torch.cat([rand(V, D), torch.zeros(padded - V, D)])
    ids = torch.randint(0, V, (B, S), generator=g)
    G = rand(B, S, D)
    wd = w.clone().requires_grad_()
    yd = F.embedding(ids, wd)
    (yd * G).sum().backward()
    emb = VocabParallelEmbedding(V, D, padded, sequence_parallel=sp)
    with torch.no_grad():
        emb.weight.copy_(sl(w, 0))
    y = emb(ids)
    (y * (seq_slice(G) if sp else G)).sum().backward()
    check(name + " out", y, seq_slice(yd.detach()) if sp else yd.detach())
    check(name + " dw", emb.weight.grad, sl(wd.grad, 0))

# ---- vocab-parallel cross-entropy with ignore_index and padded columns ----
N = 16
logits = rand(N, padded) * 3
logits[:, V:] = 100.0  # padding must never win, whatever its value
target = torch.randint(0, V, (N,), generator=g)
target[::5] = -100
ld = logits[:, :V].clone().requires_grad_()
ref = F.cross_entropy(ld, target, ignore_index=-100, reduction="none")
Gl = rand(N)
(ref * Gl).sum().backward()
lp = sl(logits, 1).clone().requires_grad_()
loss = vocab_parallel_cross_entropy(lp, target, V, ignore_index=-100)
(loss * Gl).sum().backward()
check("cross entropy loss", loss, ref.detach())
grad_full = torch.cat([ld.grad, torch.zeros(N, padded - V)], 1)
check("cross entropy dlogits", lp.grad, sl(grad_full, 1))

# ---- initialisation: each shard equals the matching slice of the TP=1 weight ----
groups.destroy()
cfg = ModelConfig(vocab_size=37, dim=16, n_layers=2, n_heads=4, n_kv_heads=4 if W == 4 else 2, ffn_dim=8 * W,
                  vocab_pad_unit=8, tie_embeddings=False)
dense = Transformer(cfg)  # no groups yet: TP=1
dense.init_weights(7)
groups.initialize(Layout(tp=W))
par = Transformer(cfg)
par.init_weights(7)
full = dict(dense.named_parameters())
for name, p in par.named_parameters():
    ref = full[name].detach()
    if p.partition_dim is not None and ref.shape[p.partition_dim] != p.shape[p.partition_dim] * W:
        pad = p.shape[p.partition_dim] * W - ref.shape[0]  # vocab padding differs with TP
        ref = torch.cat([ref, ref.new_zeros(pad, *ref.shape[1:])])
    expect = shard(ref, p.partition_dim, R, W, p.partition_blocks)
    check("init " + name, p.detach(), expect)

# ---- RNG: the default stream agrees across TP ranks, the forked TP stream differs ----
seed_everything(3, "cpu")
outside = torch.rand(8)
with get_rng_tracker().fork():
    inside = torch.rand(8)
gathered_out, gathered_in = [torch.empty(8) for _ in range(W)], [torch.empty(8) for _ in range(W)]
dist.all_gather(gathered_out, outside)
dist.all_gather(gathered_in, inside)
errors["rng default stream differs across TP"] = float(any(not torch.equal(t, outside) for t in gathered_out))
errors["rng TP stream equal across TP"] = float(any(torch.equal(gathered_in[i], gathered_in[j])
                                                    for i in range(W) for j in range(i + 1, W)))

# ---- TP communication of one decoder layer, forward + backward, as counted by the comm layer ----
for sp in (False, True):
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=4 if W == 4 else 2, ffn_dim=16 * W)
    block = Block(cfg, 0, sequence_parallel=sp)
    b, s, h = 2, 4 * W, cfg.dim
    x = rand(b, s // W if sp else s, h).requires_grad_()
    groups.take_tp_bytes()
    block(x).sum().backward()
    counted = groups.take_tp_bytes()
    # Stated here on its own: 4 activation all-reduces (2 fwd, 2 bwd) of b·s·h fp32 values; with SP
    # 4 all-gathers + 4 reduce-scatters of the same size, plus one all-reduce of each norm's h weights.
    act = b * s * h * 4
    expected = ({"all_gather": 4 * act, "reduce_scatter": 4 * act, "all_reduce": 2 * h * 4} if sp
                else {"all_reduce": 4 * act})
    assert expected == min_tp_bytes_per_layer(b, s, h, 4, sp)
    errors[f"tp bytes per layer sp={sp} differ from the minimum"] = float(counted != expected)

if R == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(errors, f, indent=1)
groups.destroy()
dist.destroy_process_group()
