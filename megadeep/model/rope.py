"""RoPE frequencies, with the scalings published checkpoints use (``model.rope_scaling.type``).

Each variant changes only the inverse frequencies (and, for YaRN, scales cos/sin), so every layout and
the exporter see one function of the config. The formulas are those of the papers and of Meta's
Llama 3.1 code, as Hugging Face transformers defines its ``rope_type``s (the tests compare logits):

- ``linear``: positions divided by ``factor`` (Chen et al., position interpolation);
- ``dynamic``: NTK-aware base ``θ·(f·L/L₀ − (f−1))^(d/(d−2))`` once a sequence ``L`` exceeds
  ``max_seq_len`` ``L₀``; within it (every length megadeep trains on) it is plain RoPE;
- ``llama3``: long wavelengths divided by ``factor``, short ones kept, a smooth blend between;
- ``yarn``: per-dimension blend of interpolated and extrapolated frequencies over a linear ramp,
  and cos/sin scaled by ``0.1·ln(factor) + 1`` (Peng et al.).
"""
from __future__ import annotations

import math

import torch

from megadeep.config.schema import ROPE_TYPES, RopeScaling


def _plain(head_dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling, original: int) -> torch.Tensor:
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, out)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, s: RopeScaling, original: int, device) -> tuple[torch.Tensor, float]:
    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency (high frequencies), 0: interpolate it
    inv_freq = _plain(head_dim, theta, device)
    inv_freq = inv_freq / s.factor * (1 - extrapolate) + inv_freq * extrapolate
    if s.attention_factor:
        scale = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        scale = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        scale = _yarn_mscale(s.factor)
    return inv_freq, scale


def inv_freq_and_scale(head_dim: int, theta: float, s: RopeScaling, max_seq_len: int, seq_len: int,
                       device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (``head_dim/2``, fp32) and the cos/sin scale for sequences of ``seq_len``."""
    original = s.original_max_position_embeddings or max_seq_len
    if s.type == "default":
        return _plain(head_dim, theta, device), 1.0
    if s.type == "linear":
        return _plain(head_dim, theta, device) / s.factor, 1.0
    if s.type == "dynamic":
        n = max(seq_len, max_seq_len)
        base = theta * (s.factor * n / max_seq_len - (s.factor - 1)) ** (head_dim / (head_dim - 2))
        return _plain(head_dim, base, device), 1.0
    if s.type == "llama3":
        return _llama3(_plain(head_dim, theta, device), s, original), 1.0
    if s.type == "yarn":
        return _yarn(head_dim, theta, s, original, device)
    raise ValueError(f"model.rope_scaling.type={s.type!r} is not one of {', '.join(ROPE_TYPES)}")
