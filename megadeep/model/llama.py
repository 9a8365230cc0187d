"""A Llama-style decoder, read top to bottom, built from tensor-parallel layers.

With TP=1 every parallel layer is an ordinary linear/embedding and this is a plain Llama. With TP>1
heads and FFN columns are split across ranks (Megatron's scheme: column-parallel in, row-parallel
out, one all-reduce per sublayer), and with sequence parallel the norms and residuals run on a
slice of the sequence. The model returns vocab-parallel logits or, given targets, the mean loss.

Parameter names are the canonical ones used by initialisation and checkpoints: ``tok_embeddings``,
``layers.N.attention.{wqkv,wo}``, ``layers.N.feed_forward.{w13,w2}``, ``layers.N.*_norm``, ``norm``,
``output``.
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megadeep import ops
from megadeep.config.schema import ModelConfig, RopeScaling
from megadeep.model.attention import Documents, DocumentSpec, attend
from megadeep.model.rope import inv_freq_and_scale
from megadeep.parallel import comm, context, groups
from megadeep.parallel.cross_entropy import mean_loss, vocab_parallel_cross_entropy
from megadeep.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    blocks_fill,
    init_sharded_,
    normal_fill,
    ones_fill,
    vocab_fill,
)
from megadeep.parallel.random import checkpoint, get_rng_tracker
from megadeep.parallel.sharding import mark


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False, fused: bool = False):
        super().__init__()
        self.eps, self.sequence_parallel, self.fused = eps, sequence_parallel, fused
        self.weight = mark(nn.Parameter(torch.ones(dim)), None)

    def reset_parameters(self, key: int | None = None) -> None:
        init_sharded_(self.weight, ones_fill, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.sequence_parallel:
            # Each rank sees a slice of the sequence, so its weight grad is partial: sum it over TP.
            w = comm.copy_to_tensor_parallel_region(w)
        return ops.rms_norm(x, w, self.eps, self.fused)


def rope_tables(seq_len: int, head_dim: int, theta: float, device, scaling: RopeScaling | None = None,
                max_seq_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for the rotate-half RoPE layout (the one Hugging Face Llama uses), in fp32, with the
    frequencies of ``scaling`` (``megadeep.model.rope``; ``max_seq_len``: the model's context)."""
    inv_freq, scale = inv_freq_and_scale(head_dim, theta, scaling or RopeScaling(), max_seq_len or seq_len,
                                         seq_len, device)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


_ROPE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def cached_rope_tables(seq_len: int, max_seq_len: int, head_dim: int, theta: float, device, dtype,
                       scaling: RopeScaling | None = None):
    """``rope_tables`` for the first ``seq_len`` positions, computed once per (shape, scaling, device,
    dtype) for ``max_seq_len`` positions and sliced: every layer of every step reads the same tables
    (rebuilding them in each layer was 3-5% of a CPU step). The table's length is part of the key,
    so its values never depend on what ran before in the process."""
    n = max(seq_len, max_seq_len)
    scaling = scaling or RopeScaling()
    key = (n, head_dim, theta, scaling, torch.device(device), dtype)
    if key not in _ROPE:
        _ROPE[key] = tuple(t.to(dtype) for t in rope_tables(n, head_dim, theta, device, scaling, max_seq_len))
    cos, sin = _ROPE[key]
    return cos[:seq_len], sin[:seq_len]


def rope_at(cos: torch.Tensor, sin: torch.Tensor, seq: int, docs: Documents | None):
    """The tables for this rank's positions of a ``seq``-long sequence, shaped for ``[b, s, heads, d]``:
    global positions (the CP slice's, under context parallelism) or, with per-document restarts, each
    token's position in its document."""
    if docs is not None and docs.positions is not None:
        pos = context.split(docs.positions)
        return cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)
    if context.world() > 1:
        pos = context.local_positions(seq, cos.device)
        cos, sin = cos[pos], sin[pos]
    return cos.unsqueeze(1), sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, sequence_parallel: bool, std: float, out_std: float, v_std: float,
                 cp_attention: str = "auto", fused: bool = False):
        super().__init__()
        self.fused = fused
        tp = groups.get_tensor_model_parallel_world_size()
        self.head_dim, self.theta, self.dropout = cfg.head_dim, cfg.rope_theta, cfg.attention_dropout
        self.max_seq_len, self.rope_scaling = cfg.max_seq_len, cfg.rope_scaling
        self.n_heads, self.n_kv_heads = cfg.n_heads // tp, cfg.kv_heads // tp
        self.cp_attention = context.pick(cp_attention, self.n_kv_heads, context.world())
        hd, sp = cfg.head_dim, sequence_parallel
        q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
        # One matmul for q, k and v: one input all-reduce (or all-gather) instead of three.
        self.wqkv = ColumnParallelLinear(
            cfg.dim, q + 2 * kv, bias=cfg.qkv_bias, blocks=(q, kv, kv), sequence_parallel=sp,
            init=blocks_fill([(q, normal_fill(std)), (kv, normal_fill(std)), (kv, normal_fill(v_std))]),
        )
        self.wo = RowParallelLinear(q, cfg.dim, sequence_parallel=sp, init=normal_fill(out_std))

    def forward(self, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        q, k, v = self.wqkv(x).split(list(self.wqkv.local_blocks), dim=-1)
        # s: this rank's positions — the whole sequence under sequence parallel (the input is gathered),
        # 1/cp of it under context parallel
        b, s, _ = q.shape
        q = q.view(b, s, self.n_heads, self.head_dim)
        k = k.view(b, s, self.n_kv_heads, self.head_dim)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        seq = s * context.world()
        cos, sin = cached_rope_tables(seq, self.max_seq_len, self.head_dim, self.theta, q.device, q.dtype,
                                      self.rope_scaling)
        cos, sin = rope_at(cos, sin, seq, docs)
        q, k = ops.rope(q, cos, sin, self.fused), ops.rope(k, cos, sin, self.fused)
        p = self.dropout if self.training else 0.0
        with get_rng_tracker().fork() if p else contextlib.nullcontext():  # heads differ per TP rank
            y = attend(q, k, v, docs, self.cp_attention, p)
        return self.wo(y.reshape(b, s, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: gate and up are one column-parallel matmul, stored ``[gate; up]`` as two blocks so each
    TP shard holds matching gate and up rows and the activation needs no communication."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool, fused: bool, std: float, out_std: float):
        super().__init__()
        ffn, sp = cfg.hidden_ffn, sequence_parallel
        self.fused = fused
        self.w13 = ColumnParallelLinear(cfg.dim, 2 * ffn, blocks=(ffn, ffn), sequence_parallel=sp, init=normal_fill(std))
        self.w2 = RowParallelLinear(ffn, cfg.dim, sequence_parallel=sp, init=normal_fill(out_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # w13's output is read by nothing but the activation, so its memory can hold its gradient.
        return self.w2(ops.swiglu(self.w13(x), self.fused, grad_in_place=True))


def xavier_std(fan_in: int, fan_out: int, gain: float) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


class Block(nn.Module):
    """One decoder layer. Pre-norm by default; with ``deepnorm``, DeepNet's post-norm
    ``x ← norm(α·x + f(x))`` with α = (2L)^¼ and the β = (8L)^-¼ init of value/output/FFN weights."""

    def __init__(self, cfg: ModelConfig, layer_id: int, sequence_parallel: bool = False, fused: bool = False,
                 cp_attention: str = "auto"):
        super().__init__()
        self.layer_id = layer_id
        self.deepnorm, self.dropout, self.sequence_parallel = cfg.deepnorm, cfg.dropout, sequence_parallel
        self.checkpointing = cfg.activation_checkpointing
        n_layers, d, ffn = cfg.n_layers, cfg.dim, cfg.hidden_ffn
        if cfg.deepnorm:
            self.alpha = (2 * n_layers) ** 0.25
            beta = (8 * n_layers) ** -0.25
            qk_std = xavier_std(d, cfg.n_heads * cfg.head_dim, 1.0)
            v_std = xavier_std(d, cfg.kv_heads * cfg.head_dim, beta)
            o_std = xavier_std(cfg.n_heads * cfg.head_dim, d, beta)
            up_std, down_std = xavier_std(d, ffn, beta), xavier_std(ffn, d, beta)
        else:
            self.alpha = 1.0
            qk_std = v_std = up_std = cfg.init_std
            o_std = down_std = cfg.init_std / math.sqrt(2 * n_layers) if cfg.residual_scaling else cfg.init_std
        sp = sequence_parallel
        self.attention_norm = RMSNorm(d, cfg.norm_eps, sp, fused)
        self.attention = Attention(cfg, sp, qk_std, o_std, v_std, cp_attention, fused)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps, sp, fused)
        if cfg.is_moe_layer(layer_id):
            from megadeep.model.moe import MoEFeedForward

            self.feed_forward = MoEFeedForward(cfg, sp, fused, up_std, down_std)
        else:
            self.feed_forward = FeedForward(cfg, sp, fused, up_std, down_std)

    def drop(self, y: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout):
            return y
        # Sequence-parallel shards hold different tokens, so they need different masks.
        with get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext():
            return F.dropout(y, self.dropout)

    def _forward(self, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        if self.deepnorm:
            h = self.attention_norm(self.alpha * x + self.drop(self.attention(x, docs)))
            return self.ffn_norm(self.alpha * h + self.drop(self.feed_forward(h)))
        h = x + self.drop(self.attention(self.attention_norm(x), docs))
        return h + self.drop(self.feed_forward(self.ffn_norm(h)))

    def forward(self, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        if self.checkpointing and self.training:
            return checkpoint(self._forward, x, docs)
        return self._forward(x, docs)


class TokenEmbedding(nn.Module):
    """Vocab-parallel embedding; also the LM head when embeddings are tied."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool = False):
        super().__init__()
        tp = groups.get_tensor_model_parallel_world_size()
        self.sequence_parallel = sequence_parallel
        self.embedding = VocabParallelEmbedding(
            cfg.vocab_size, cfg.dim, cfg.padded_vocab(tp), sequence_parallel, std=cfg.init_std
        )

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: whole sequences; under context parallelism this rank embeds its CP slice."""
        return self.embedding(context.split(tokens))


def head_input(h: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Enter the column-parallel LM head: gather the sequence (SP) or mark the TP region."""
    if sequence_parallel:
        return comm.gather_from_sequence_parallel_region(h)
    return comm.copy_to_tensor_parallel_region(h)


def tied_logits(embedding: TokenEmbedding, h: torch.Tensor) -> torch.Tensor:
    return F.linear(head_input(h, embedding.sequence_parallel), embedding.weight)


class OutputHead(nn.Module):
    """Untied LM head: a column-parallel projection to this rank's slice of the (padded) vocab."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool = False):
        super().__init__()
        tp = groups.get_tensor_model_parallel_world_size()
        self.sequence_parallel = sequence_parallel
        self.proj = ColumnParallelLinear(cfg.dim, cfg.padded_vocab(tp), init=vocab_fill(cfg.vocab_size, cfg.init_std))

    @property
    def weight(self) -> nn.Parameter:
        return self.proj.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(head_input(h, self.sequence_parallel), self.proj.weight)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int = -100,
            cp_grad_scale: float = 1.0, overwrite: bool = False) -> torch.Tensor:
    """Mean loss over the whole sequences' tokens. ``targets`` are whole sequences; under context
    parallelism ``logits`` are this rank's CP slice and the loss is its share of the global mean
    (``context.loss_share``; ``cp_grad_scale`` for engines that average gradients over CP).
    ``overwrite``: ``logits`` are scratch (see ``vocab_parallel_cross_entropy``)."""
    if context.world() == 1:
        per_token = vocab_parallel_cross_entropy(logits, targets, vocab_size, ignore_index, overwrite)
        return mean_loss(per_token, targets, ignore_index)
    targets = context.split(targets)
    per_token = vocab_parallel_cross_entropy(logits, targets, vocab_size, ignore_index, overwrite)
    return context.loss_share(per_token, targets != ignore_index, cp_grad_scale)


class Transformer(nn.Module):
    """``documents``: packed samples attend only within their documents (``data.document_mask``);
    ``cp_attention``: the context-parallel attention variant (``parallel.cp_attention``);
    ``cp_grad_scale``: see ``lm_loss`` (``ResolvedRun.cp_grad_scale``)."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool = False, documents: DocumentSpec | None = None,
                 cp_attention: str = "auto", cp_grad_scale: float = 1.0):
        super().__init__()
        self.cfg, self.sequence_parallel, self.documents = cfg, sequence_parallel, documents
        self.cp_grad_scale = cp_grad_scale
        fused = ops.use_fused(cfg.fused_kernels)
        self.tok_embeddings = TokenEmbedding(cfg, sequence_parallel)
        self.layers = nn.ModuleList(Block(cfg, i, sequence_parallel, fused, cp_attention) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, sequence_parallel, fused)
        self.output = None if cfg.tie_embeddings else OutputHead(cfg, sequence_parallel)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens``/``targets``: whole sequences [batch, seq] (every CP rank gets the same ones)."""
        docs = Documents.of(tokens, self.documents) if self.documents else None
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, docs)
        h = self.norm(h)
        logits = tied_logits(self.tok_embeddings, h) if self.output is None else self.output(h)
        if targets is None:
            return logits  # [batch, seq (/CP), padded_vocab / TP]
        return lm_loss(logits, targets, self.cfg.vocab_size, cp_grad_scale=self.cp_grad_scale, overwrite=True)  # MoE router losses: see model/moe.py

    def init_weights(self, seed: int) -> None:
        init_weights(self, "", seed)


def param_key(seed: int, name: str) -> int:
    """The counter-RNG key of a parameter, from (seed, canonical name): init does not depend on which
    other parameters this rank holds, so TP shards and pipeline stages match the single-process model."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def init_weights(module: nn.Module, prefix: str, seed: int) -> None:
    """Initialise every layer under ``module``, whose canonical name is ``prefix``, and recompute
    non-persistent buffers (``reset_buffers()``, e.g. tables that ``to_empty`` left uninitialised)."""
    for name, sub in module.named_modules():
        if hasattr(sub, "reset_buffers"):
            sub.reset_buffers()
        if any(True for _ in sub.parameters(recurse=False)) and hasattr(sub, "reset_parameters"):
            sub.reset_parameters(param_key(seed, ".".join(p for p in (prefix, name) if p)))


def materialize(module: nn.Module, prefixes: dict[str, nn.Module], device: torch.device, seed: int) -> None:
    """Allocate a module built on the meta device on ``device`` (each rank its own shards, nothing
    more) and initialise it once, each part under its canonical name."""
    unset = [n or type(module).__name__ for n, sub in module.named_modules()
             if any(True for _ in sub.buffers(recurse=False)) and not hasattr(sub, "reset_buffers")]
    if unset:  # to_empty leaves buffers uninitialised: their module must say how to recompute them
        raise TypeError(f"{unset[0]} has buffers but no reset_buffers(); it cannot be built on the meta device")
    tags = {name: dict(p.__dict__) for name, p in module.named_parameters()}  # sharding marks
    module.to_empty(device=device)  # new Parameter objects: the marks must be carried over
    for name, p in module.named_parameters():
        p.__dict__.update(tags[name])
    for prefix, part in prefixes.items():
        init_weights(part, prefix, seed)
