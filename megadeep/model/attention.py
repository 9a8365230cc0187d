"""Causal self-attention over whole sequences, packed documents and context-parallel slices.

One entry point, :func:`attend`, on ``[batch, seq, heads, head_dim]`` tensors. Without document
masking or CP it is SDPA's causal kernel. Document masking (``data.document_mask``) keeps packed
documents apart with a block-diagonal causal mask (SDPA with a boolean mask: on CPU that is the path
PyTorch has; a GPU varlen/flash path is not implemented). Under CP, see
:mod:`megadeep.parallel.context` for the Ulysses and all-gather-KV variants; both build their mask
from global positions, so the zig-zag split and document boundaries compose.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megadeep.parallel import context, groups


@dataclass(frozen=True)
class DocumentSpec:
    """How a packed sample is cut into documents: a document ends with token ``sep`` (the eos)."""
    sep: int
    restart_positions: bool = False  # RoPE positions start at 0 in every document


@dataclass
class Documents:
    """The document structure of one batch, computed once per forward from the whole token sequence."""
    ids: torch.Tensor  # [batch, seq]: document index of every position (the sep belongs to its document)
    positions: torch.Tensor | None  # [batch, seq]: position within the document, or None (global positions)

    @classmethod
    def of(cls, tokens: torch.Tensor, spec: DocumentSpec) -> Documents:
        is_sep = (tokens == spec.sep).long()
        ids = is_sep.cumsum(1) - is_sep
        positions = None
        if spec.restart_positions:
            idx = torch.arange(tokens.shape[1], device=tokens.device).expand_as(ids)
            starts = torch.zeros_like(ids)
            starts[:, 1:] = torch.where(ids[:, 1:] != ids[:, :-1], idx[:, 1:], 0)
            positions = idx - starts.cummax(1).values
        return cls(ids, positions)


def allowed(pos_q: torch.Tensor, pos_k: torch.Tensor, docs: Documents | None) -> torch.Tensor:
    """Boolean ``[batch|1, 1, q, k]`` mask: key at global position pos_k is visible from pos_q."""
    mask = (pos_k[None, :] <= pos_q[:, None])[None, None]
    if docs is not None:
        mask = mask & (docs.ids[:, pos_q, None] == docs.ids[:, None, pos_k])[:, None]
    return mask


def _sdpa(q, k, v, mask, dropout: float) -> torch.Tensor:
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
        dropout_p=dropout, enable_gqa=k.shape[2] != q.shape[2],
    )
    return y.transpose(1, 2)


def _whole(q, k, v, docs: Documents | None, dropout: float) -> torch.Tensor:
    """Attention over a whole sequence in natural order."""
    if docs is None:
        return _sdpa(q, k, v, None, dropout)
    pos = torch.arange(q.shape[1], device=q.device)
    return _sdpa(q, k, v, allowed(pos, pos, docs), dropout)


def attend(q, k, v, docs: Documents | None, method: str, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention of this rank's queries; ``method`` is the CP variant (ulysses | allgather)."""
    cp = context.world()
    if cp == 1:
        return _whole(q, k, v, docs, dropout)
    seq = q.shape[1] * cp
    order = context.gathered_positions(seq, q.device)  # global position of each gathered row
    if method == "ulysses":
        from deepspeed.sequence.layer import DistributedAttention

        natural = torch.argsort(order)

        def local(q, k, v):  # the whole sequence (rows in rank order) for heads/cp heads
            y = _whole(q[:, natural], k[:, natural], v[:, natural], docs, dropout)
            return y[:, order]

        group = groups.get_context_parallel_group()
        return DistributedAttention(local, group, scatter_idx=2, gather_idx=1)(q, k, v, 0)
    pos_q = context.local_positions(seq, q.device)
    return _sdpa(q, context.gather(k), context.gather(v), allowed(pos_q, order, docs), dropout)
