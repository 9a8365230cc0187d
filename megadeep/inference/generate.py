"""Autoregressive decoding with megadeep's own (TP-sharded) model: KV cache, greedy / temperature /
top-k / top-p sampling, seeded, batches of prompts of different lengths (left padding with
per-sequence positions), stop at EOS or after ``max_new_tokens``.

The training forward (``Transformer.forward``) has no cache, positions or padding mask, and keeping it
that way keeps the training path untouched; ``forward`` here walks the same modules (the same TP
layers, norms, RoPE tables and FFN) and only redoes attention's core with a cache and a mask. The tests
check it equals ``Transformer.forward`` on an unpadded batch and transformers' ``generate``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megadeep import ops
from megadeep.errors import ConfigError
from megadeep.model.llama import Attention, Block, Transformer, cached_rope_tables, tied_logits
from megadeep.parallel import comm, groups


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    eos_id: int | None = None  # None: stop only at max_new_tokens
    use_cache: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class KVCache:
    """Keys and values of every layer for ``max_len`` slots; ``length`` slots are filled."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, model: Transformer, batch: int, max_len: int) -> "KVCache":
        a: Attention = model.layers[0].attention
        p = model.tok_embeddings.weight
        shape = (batch, a.n_kv_heads, max_len, a.head_dim)
        n = len(model.layers)
        return cls([p.new_zeros(shape) for _ in range(n)], [p.new_zeros(shape) for _ in range(n)])


def _attention(a: Attention, x, cos, sin, mask, cache: KVCache | None, layer: int):
    q, k, v = a.wqkv(x).split(list(a.wqkv.local_blocks), dim=-1)
    b, s, _ = q.shape
    q = q.view(b, s, a.n_heads, a.head_dim).transpose(1, 2)
    k = k.view(b, s, a.n_kv_heads, a.head_dim).transpose(1, 2)
    v = v.view(b, s, a.n_kv_heads, a.head_dim).transpose(1, 2)
    q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
    if cache is not None:
        end = cache.length + s
        cache.k[layer][:, :, cache.length:end], cache.v[layer][:, :, cache.length:end] = k, v
        k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=a.n_kv_heads != a.n_heads)
    return a.wo(y.transpose(1, 2).reshape(b, s, a.n_heads * a.head_dim))


def _block(blk: Block, x, cos, sin, mask, cache, layer):
    attn = lambda h: _attention(blk.attention, h, cos, sin, mask, cache, layer)  # noqa: E731
    if blk.deepnorm:
        h = blk.attention_norm(blk.alpha * x + attn(x))
        return blk.ffn_norm(blk.alpha * h + blk.feed_forward(h))
    h = x + attn(blk.attention_norm(x))
    return h + blk.feed_forward(blk.ffn_norm(h))


@torch.no_grad()
def forward(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
            cache: KVCache | None = None, last: bool = False) -> torch.Tensor:
    """Full-vocabulary logits ``[batch, new, vocab]`` of ``tokens`` (the ``new`` tokens after the cache's,
    or the whole sequence without a cache); ``last``: of the last position only (what decoding reads).
    ``positions``: each token's RoPE position; ``valid`` ``[batch, cached + new]``: False at left padding,
    which no token attends to."""
    if model.sequence_parallel:
        raise ConfigError("generation runs without sequence parallelism (load the model with it off)")
    cfg = model.cfg
    b, s = tokens.shape
    start = cache.length if cache is not None else 0
    cos, sin = cached_rope_tables(int(positions.max()) + 1, cfg.max_seq_len, cfg.head_dim, cfg.rope_theta,
                                  tokens.device, model.tok_embeddings.weight.dtype, cfg.rope_scaling)
    cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [b, 1, s, head_dim]
    slot = torch.arange(start + s, device=tokens.device)
    query = slot[start:, None]
    # causal over slots; a padded query sees itself only (an all-masked row would be NaN)
    mask = (slot[None, :] <= query) & (valid[:, None, :] | (slot[None, :] == query))
    mask = mask[:, None]  # [b, 1, s, start + s]
    h = model.tok_embeddings(tokens)
    for i, blk in enumerate(model.layers):
        h = _block(blk, h, cos, sin, mask, cache, i)
    if cache is not None:
        cache.length += s
    h = model.norm(h[:, -1:] if last else h)
    logits = tied_logits(model.tok_embeddings, h) if model.output is None else model.output(h)
    return comm.gather_from_tensor_parallel_region(logits)[..., : cfg.vocab_size]


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    """The next token of each row of ``logits [batch, vocab]``."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        ordered, index = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


@dataclass
class Generation:
    tokens: list[list[int]]  # per prompt, the new tokens (up to and including EOS)
    new_tokens: int  # tokens generated, over the batch, not counting those after a sequence's EOS
    prefill_s: float
    decode_s: float
    steps: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


def _same_on_tp(t: torch.Tensor) -> torch.Tensor:
    """Every TP rank continues with TP rank 0's choice (their logits are equal: this makes it certain)."""
    if groups.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(t, groups.get_tensor_model_parallel_src_rank(), group=groups.get_tensor_model_parallel_group())
    return t


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], s: Sampling, pad_id: int = 0,
             on_token: Callable[[torch.Tensor], None] | None = None) -> Generation:
    """Continue each prompt (token ids, any lengths) with ``model``; ``on_token(next_tokens)`` sees each step."""
    s.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    device = model.tok_embeddings.weight.device
    longest, limit = max(len(p) for p in prompts), model.cfg.max_seq_len
    if longest + s.max_new_tokens > limit:
        raise ConfigError(f"a prompt of {longest} tokens plus max_new_tokens={s.max_new_tokens} exceeds the "
                          f"model's context of {limit} tokens; shorten the prompt or ask for fewer tokens")
    b = len(prompts)
    tokens = torch.full((b, longest), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((b, longest), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding: every sequence's next token is in the last column
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, longest - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.empty(model, b, longest + s.max_new_tokens) if s.use_cache else None
    gen = torch.Generator(device=device).manual_seed(s.seed)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    start = time.perf_counter()
    logits = forward(model, tokens, positions, valid, cache, last=True)[:, -1]
    prefill = time.perf_counter() - start
    counted = 0
    for step in range(s.max_new_tokens):
        nxt = _same_on_tp(pick(logits, s, gen).masked_fill(done, pad_id))
        counted += int((~done).sum())
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if s.eos_id is not None:
            done |= nxt == s.eos_id
        if bool(done.all()) or step == s.max_new_tokens - 1:
            break
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if cache is not None:
            logits = forward(model, nxt[:, None], positions[:, -1:], valid, cache, last=True)[:, -1]
        else:
            logits = forward(model, tokens, positions, valid, last=True)[:, -1]
    decode = time.perf_counter() - start - prefill
    new = torch.stack(out, dim=1).tolist()
    result = []
    for row in new:
        if s.eos_id is not None and s.eos_id in row:
            row = row[: row.index(s.eos_id) + 1]
        result.append(row)
    return Generation(result, counted, prefill, decode)
