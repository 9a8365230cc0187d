"""Cross-entropy over logits whose vocabulary is split across TP ranks, without gathering them.

Three small all-reduces (max, target logit, sum of exponentials) replace an all-gather of
``[tokens, vocab]``. Columns at or past the real ``vocab_size`` (TP padding) are masked to -inf, so
they can never win the max nor take probability mass.

With one vocab shard and no padding (TP=1, the common single-rank case) there is nothing to reduce and
``_CrossEntropy`` takes over: one fused ``log_softmax`` pass, the gradient formed in that buffer during the
forward, and scaled in place in the backward -- 3 passes over ``[tokens, vocab]`` instead of ~7 (and
F.cross_entropy's log_softmax backward would add a reduction and a fresh buffer).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megadeep.parallel import groups
from megadeep.parallel.comm import all_reduce_


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, ignore_index):
        per_rank = logits.shape[-1]
        start = groups.get_tensor_model_parallel_rank() * per_rank

        logits = logits.float()
        n_real = min(max(vocab_size - start, 0), per_rank)
        if n_real < per_rank:
            logits = logits.clone()
            logits[..., n_real:] = float("-inf")

        logits_max = all_reduce_(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        ignored = target == ignore_index
        local_t = target - start
        in_shard = (local_t >= 0) & (local_t < per_rank) & ~ignored
        local_t = local_t.masked_fill(~in_shard, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)

        exp = shifted.exp_()
        sum_exp = all_reduce_(exp.sum(dim=-1))
        all_reduce_(target_logit)

        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, in_shard, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, in_shard, ignored = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -in_shard.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, overwrite):
        ignored = target == ignore_index
        safe_t = target.masked_fill(ignored, 0).unsqueeze(-1)
        if overwrite and logits.dtype == torch.float32:
            # Into the logits' own buffer: a fresh [tokens, vocab] tensor costs more in page faults
            # than log_softmax itself on CPU (~40 ms per step at vocab 32000, 1024 tokens).
            logp = torch._log_softmax(logits, -1, False, out=logits)
            ctx.mark_dirty(logits)
        else:
            logp = torch.log_softmax(logits, -1, dtype=torch.float32)
        loss = logp.gather(-1, safe_t).squeeze(-1).neg_().masked_fill_(ignored, 0.0)
        grad = logp.exp_()  # softmax - onehot(target), unscaled
        grad.scatter_add_(-1, safe_t, (~ignored).unsqueeze(-1).to(grad.dtype).neg_())
        ctx.save_for_backward(grad, ignored)
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)  # else backward gets a zero-filled [tokens, vocab] for ``logits``
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad, ignored = ctx.saved_tensors
        # In place: mul_ bumps grad's version, so a second backward (retain_graph) fails loudly.
        return grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 ignore_index: int = -100, overwrite: bool = False) -> torch.Tensor:
    """Per-token loss (0 where ``target == ignore_index``) for vocab-parallel ``logits[..., V/TP]``.
    ``overwrite``: the caller will not read ``logits`` again, so the single-shard path may reuse them."""
    if groups.get_tensor_model_parallel_world_size() == 1 and logits.shape[-1] == vocab_size:
        return _CrossEntropy.apply(logits, target, ignore_index, overwrite)[0]
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, ignore_index)


def mean_loss(per_token: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    count = (target != ignore_index).sum().clamp(min=1)
    return per_token.sum() / count
