"""Mixture-of-experts FFN (Mixtral's): an fp32 softmax router picks ``top_k`` of ``num_experts`` SwiGLU
experts per token and mixes their outputs with the renormalised top-k probabilities.

Experts are stored batched (``w13`` is ``[E, 2·ffn, dim]`` stacked ``[gate; up]``, ``w2`` is
``[E, dim, ffn]``: transformers' ``MixtralExperts`` layout). Each rank holds ``E/EP`` consecutive
experts, each split over TP like the dense FFN; tokens travel to their experts' rank and back by
all-to-all (``megadeep.parallel.experts``). The router is replicated. Routing is decided on the
tokens a rank holds (one micro-batch), so capacity, the load-balancing loss and the load fractions
do not depend on the layout as long as the micro-batches do not.

Why not ``deepspeed.moe.layer.MoE``: its gates (``TopKGate``) always pad experts to a capacity, sample
the second expert with Gumbel noise by default, use their own aux-loss normalisation and cannot hold
TP-sharded experts; we need Mixtral's exact math (for HF parity), dropless routing and TP. DeepSpeed
still treats these experts as expert parameters (``allreduce=False`` + ``group_name``, its expert
groups are ours, see ``megadeep.parallel.experts.register_with_deepspeed``), so its engine reduces
their gradients over the expert-data-parallel group and ZeRO partitions them in their own groups.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megadeep import ops
from megadeep.config.schema import ModelConfig
from megadeep.parallel import comm, counter_rng, groups
from megadeep.parallel.experts import all_to_all, exchange_counts, mark_expert
from megadeep.parallel.layers import init_sharded_, normal_fill
from megadeep.parallel.sharding import mark, shard


def _expert_key(key: int, expert: int) -> int:
    """Each expert's init key depends on its global index only, so EP shards match the EP=1 model."""
    return int.from_bytes(hashlib.sha256(f"{key}/expert{expert}".encode()).digest()[:8], "little") >> 1


class Experts(nn.Module):
    """This rank's routed experts: ``E/EP`` of them, each ``w13``/``w2`` split over TP like ``FeedForward``."""

    def __init__(self, cfg: ModelConfig, std: float, out_std: float):
        super().__init__()
        tp, ep = groups.get_tensor_model_parallel_world_size(), groups.get_expert_parallel_world_size()
        e, f, d = cfg.moe.num_experts, cfg.expert_ffn, cfg.dim
        self.n_local = e // ep
        self.first = groups.get_expert_parallel_rank() * self.n_local
        self.std, self.out_std = std, out_std
        self.w13 = mark_expert(mark(nn.Parameter(torch.empty(self.n_local, 2 * f // tp, d)), 1, (f, f)), ep)
        self.w2 = mark_expert(mark(nn.Parameter(torch.empty(self.n_local, d, f // tp)), 2), ep)

    @torch.no_grad()
    def reset_parameters(self, key: int | None = None) -> None:
        key = int(torch.randint(0, 1 << 62, ())) if key is None else key
        tp_rank, tp = groups.get_tensor_model_parallel_rank(), groups.get_tensor_model_parallel_world_size()
        f = self.w2.shape[2] * tp
        for j in range(self.n_local):
            k = _expert_key(key, self.first + j)
            for i, (w, std, blocks) in enumerate(((self.w13, self.std, (f, f)), (self.w2, self.out_std, None))):
                dim = w.partition_dim - 1  # within one expert's matrix
                full = [w.shape[1], w.shape[2]]
                full[dim] *= tp
                values = std * counter_rng.normal(k + i, torch.arange(math.prod(full), device=w.device))
                w[j].copy_(shard(values.view(full), dim, tp_rank, tp, blocks))

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``x``: this rank's tokens for its ``n_local`` experts, grouped by expert, ``counts`` each."""
        # unbind: one backward op stacks every expert's gradient (indexing w13[j] would make each
        # expert's backward write a zero tensor the size of all experts)
        w13, w2 = self.w13.unbind(0), self.w2.unbind(0)
        out = [F.linear(ops.swiglu(F.linear(h, w13[j])), w2[j]) for j, h in enumerate(x.split(counts))]
        return torch.cat(out) if out else x


class Router(nn.Module):
    """``E × dim`` gate, replicated over TP and EP; its logits are computed in fp32."""

    def __init__(self, cfg: ModelConfig, std: float):
        super().__init__()
        self.weight = mark(nn.Parameter(torch.empty(cfg.moe.num_experts, cfg.dim)), None)
        self.std = std

    def reset_parameters(self, key: int | None = None) -> None:
        init_sharded_(self.weight, normal_fill(self.std), key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


@dataclasses.dataclass
class Routing:
    """Which experts each of ``T`` tokens goes to (``[T, k]``), with what weight, and what survived capacity."""

    experts: torch.Tensor  # [T, k] expert indices, best first
    weights: torch.Tensor  # [T, k] renormalised top-k probabilities (fp32)
    keep: torch.Tensor  # [T, k] bool: False where the expert was full (the slot is dropped)
    probs: torch.Tensor  # [T, E] router softmax (fp32)
    logits: torch.Tensor  # [T, E]


def route(logits: torch.Tensor, top_k: int, capacity_factor: float) -> Routing:
    """Mixtral's top-k routing. Ties go to the lower expert index (a stable sort, where ``torch.topk``
    leaves the order unspecified). With ``capacity_factor`` > 0 each expert takes at most
    ceil(cf·T·k/E) token slots, first choices first and, within a choice, tokens in order (GShard's
    priority); the rest are dropped (their share of the output is zero: the residual carries the token)."""
    probs = logits.softmax(dim=-1)
    top_p, top_e = probs.sort(dim=-1, descending=True, stable=True)
    top_p, top_e = top_p[:, :top_k], top_e[:, :top_k]
    weights = top_p / top_p.sum(dim=-1, keepdim=True)
    keep = torch.ones_like(top_e, dtype=torch.bool)
    if capacity_factor > 0:
        t, e = logits.shape
        capacity = math.ceil(capacity_factor * t * top_k / e)
        slot_major = top_e.t().reshape(-1)  # all first choices, then all second choices, ...
        position = F.one_hot(slot_major, e).cumsum(0).gather(1, slot_major[:, None]).squeeze(1) - 1
        keep = (position < capacity).view(top_k, t).t()
    return Routing(top_e, weights, keep, probs, logits)


def balance_loss(r: Routing, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard load-balancing loss E·Σₑ fₑ·Pₑ (1 when perfectly balanced) and the load fractions
    fₑ: the share of routed (token, slot) pairs choosing expert e (before capacity), Pₑ the mean
    router probability. It is Mixtral's ``load_balancing_loss_func`` divided by top-k."""
    load = torch.bincount(r.experts.reshape(-1), minlength=num_experts).float() / r.experts.numel()
    return num_experts * (load * r.probs.mean(dim=0)).sum(), load


class _RouterLossGrad(torch.autograd.Function):
    """Identity on the layer's output, whose backward also starts the router losses' backward with
    gradient ``scale`` (Megatron's MoEAuxLossAutoScaler). The router losses thus train every layer's
    router wherever it runs, though the LM loss (and DeepSpeed's backward) exist only on the last
    pipeline stage, and under activation checkpointing (the recomputed forward carries them)."""

    @staticmethod
    def forward(ctx, out, loss, scale):
        ctx.scale, ctx.like = scale, loss.detach()
        return out

    @staticmethod
    def backward(ctx, g):
        return g, torch.full_like(ctx.like, ctx.scale), None


class MoEFeedForward(nn.Module):
    """Route, dispatch to the experts (over EP), combine; plus optional always-on shared experts.

    The router losses (aux_loss_coef · balance + z_loss_coef · z, averaged over the MoE layers) are
    part of the training objective but not of the returned LM loss: their gradient enters through
    ``_RouterLossGrad``, scaled by ``loss_scale``, the factor the engine applies to the LM loss before
    backward (1 / grad_accum_steps, set by the trainer). After each forward ``stats`` holds the losses
    and the load fractions and dropped-slot fraction, for metrics."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool, fused: bool, std: float, out_std: float):
        super().__init__()
        from megadeep.model.llama import FeedForward  # the dense SwiGLU, for shared experts

        self.moe = cfg.moe
        self.router = Router(cfg, std)
        self.experts = Experts(cfg, std, out_std)
        shared = cfg.moe.shared_experts * cfg.expert_ffn
        self.shared = (FeedForward(dataclasses.replace(cfg, ffn_dim=shared), sequence_parallel, fused, std, out_std)
                       if shared else None)
        self.stats: dict[str, torch.Tensor] = {}
        self.layer_share = 1.0 / sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        self.stats_sum: torch.Tensor | None = None
        self.stats_count = 0
        self.loss_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, e = x.shape, self.moe.num_experts
        x = x.reshape(-1, shape[-1])
        r = route(self.router(x), self.moe.top_k, self.moe.capacity_factor)
        aux, load = balance_loss(r, e)
        z = torch.logsumexp(r.logits, dim=-1).pow(2).mean()
        self.stats = {"aux_loss": aux.detach(), "z_loss": z.detach(), "load": load.detach(),
                      "dropped": 1.0 - r.keep.float().mean().detach()}
        if self.training:  # summed over the step's micro-batches for the metrics (``take_stats``)
            v = torch.cat([torch.stack([aux.detach(), z.detach(), self.stats["dropped"]]), load.detach()]).double()
            self.stats_sum = v if self.stats_count == 0 else self.stats_sum + v
            self.stats_count += 1
        token = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(r.experts)[r.keep]
        expert, weight = r.experts[r.keep], r.weights[r.keep]
        order = torch.argsort(expert, stable=True)  # grouped by expert, tokens in order within each
        token, expert, weight = token[order], expert[order], weight[order]
        counts = torch.bincount(expert, minlength=e)
        y = self._dispatch(comm.copy_to_tensor_parallel_region(x)[token], counts)
        out = torch.zeros_like(x).index_add(0, token, y * weight[:, None].to(y.dtype))
        out = out.view(shape)
        if torch.is_grad_enabled() and aux.requires_grad:
            router_loss = self.moe.aux_loss_coef * aux + self.moe.z_loss_coef * z
            out = _RouterLossGrad.apply(out, router_loss, self.loss_scale * self.layer_share)
        return out if self.shared is None else out + self.shared(x.view(shape))

    def _dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert outputs for ``x`` (rows grouped by global expert, ``counts`` each), in the same order."""
        ep, n_local = groups.get_expert_parallel_world_size(), self.experts.n_local
        if ep == 1:
            return comm.reduce_from_tensor_parallel_region(self.experts(x, counts.tolist()))
        # received[s, j]: rows source rank s sends for local expert j
        received = exchange_counts(counts.view(ep, n_local))
        send_splits = counts.view(ep, n_local).sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        h = all_to_all(x, send_splits, recv_splits)  # source-major, expert-minor
        # regroup expert-major (all sources' rows for expert 0, then expert 1, ...) and back after
        seg = torch.repeat_interleave(torch.arange(received.numel(), device=x.device), received.reshape(-1))
        by_expert = torch.argsort(seg % n_local * ep + seg // n_local, stable=True)
        y = self.experts(h[by_expert], received.sum(0).tolist())
        y = comm.reduce_from_tensor_parallel_region(y)
        y = torch.empty_like(y).index_copy(0, by_expert, y)
        return all_to_all(y, recv_splits, send_splits)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def set_loss_scale(model: nn.Module, scale: float) -> None:
    """The factor the engine scales the LM loss by before backward (1 / grad_accum_steps)."""
    for m in moe_layers(model):
        m.loss_scale = scale


def take_stats(model: nn.Module, num_experts: int) -> torch.Tensor:
    """This rank's MoE layers' router metrics since the last call, each layer's averaged over its
    training forwards, then summed over layers, as a CPU fp64 vector ``[layers, aux_loss, z_loss,
    dropped, load_0 … load_{E-1}]`` (sums add up over pipeline stages; divide by ``layers``)."""
    out = torch.zeros(4 + num_experts, dtype=torch.float64)
    for f in moe_layers(model):
        if f.stats_count:
            out[0] += 1
            out[1:] += (f.stats_sum / f.stats_count).cpu()
            f.stats_sum, f.stats_count = None, 0
    return out


def stats_record(v: torch.Tensor) -> dict:
    """Averaged ``take_stats`` (without the layer count) as the metrics record's ``moe`` entry."""
    return {"aux_loss": v[0].item(), "z_loss": v[1].item(), "dropped_fraction": v[2].item(),
            "load": {str(e): x for e, x in enumerate(v[3:].tolist())}}
