"""Counter-based random normals: element ``i`` of a parameter is a pure function of (key, i).

A ``torch.Generator`` can only produce a tensor front to back, so a rank that holds one shard of a
weight would have to draw the whole weight to get its slice. Hashing each element's global index
instead (splitmix64, then Box-Muller) gives any slice directly, at a cost proportional to the slice,
and the slice equals the same slice of the single-process tensor by construction. torch has no
uint64 arithmetic on every device, so the hash runs in int64 (multiplication wraps) with logical
shifts written as arithmetic shift + mask.
"""
from __future__ import annotations

import math

import torch


def _int64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s).bitwise_and_((1 << (64 - s)) - 1)


# In place wherever the input is not the caller's: construction hashes every element a rank holds, and
# each temporary is a fresh int64 tensor as large as the shard (page faults, memory traffic).
def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Vigna's splitmix64 finaliser of ``x + golden`` on int64 tensors (bit-identical to the uint64 one)."""
    x = x + _GOLDEN
    x ^= _shr(x, 30)
    x *= _M1
    x ^= _shr(x, 27)
    x *= _M2
    x ^= _shr(x, 31)
    return x


def uniform(key: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """float64 in (0, 1), one per int64 ``index``; ``stream`` 0/1 gives two independent draws."""
    h = splitmix64(index * 2 + stream)
    h ^= _int64(key % (1 << 64))
    return _shr(splitmix64(h), 11).double().add_(0.5).mul_(2.0**-53)


def normal(key: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 samples for the global element indices ``index`` (Box-Muller)."""
    u1, u2 = uniform(key, index, 0), uniform(key, index, 1)
    return u1.log_().mul_(-2.0).sqrt_().mul_(u2.mul_(2 * math.pi).cos_()).float()
