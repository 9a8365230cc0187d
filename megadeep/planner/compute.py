"""Seconds of the kernels one rank runs for one micro-batch of one layer, from the shapes it multiplies.

Two models answer the same questions (``gemm_s``, ``elementwise_s``, ``attention_s``):

- ``TableCompute``: a soft roofline per GPU type. A matmul takes its FLOPs at the rate large GEMMs
  reach plus its operand and result bytes at the memory rate, so efficiency rises with size (a thin
  GEMM is memory-bound, a large one compute-bound) instead of being one fraction of peak. Attention's
  core is costed by its own FLOPs and memory traffic: with a fused (flash) kernel its causal FLOPs at
  the fused kernel's rate; without one (Megatron 2021) the batched QKᵀ/AV GEMMs plus the score
  matrix written, softmaxed, dropped out and read back through HBM. Norms, residuals, RoPE and SwiGLU
  are memory-bound: their bytes at the memory rate.
- ``megadeep.planner.calibrate.Calibration``: the same questions answered from timings taken on the
  machine itself (``megadeep plan --calibrate``).

Table rates (per GPU in hardware.py): dense bf16 peak and HBM bandwidth from NVIDIA's data sheets,
the latter at the ~85% that streaming kernels reach; the fraction of peak large GEMMs sustain is the
one fitted number: A100 0.75, the value with the least mean log error over the published A100 runs
of tests/test_planner.py (cuBLAS measures roughly 0.7-0.8 at those shapes). H100: GEMMs 0.69 and fused
attention 0.25 × the GEMM rate, the pair with the least mean log error over MosaicML's published H100
BF16 runs (tests/test_planner.py); that attention rate is of the 2023 Triton/FlashAttention kernels
those runs used, not Hopper-tuned ones (FlashAttention-3 reports about twice as much). A100's fused
attention rate, 0.75 × the GEMM rate, is not fitted (Narayanan's runs use no fused attention).
Calibration replaces every one of these by a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

from megadeep.model.accounting import Gemm, attention_flops

# Flash attention forward does QKᵀ and AV on the causal half; its backward recomputes the scores
# (FlashAttention-2 paper: backward ≈ 2.5 × forward FLOPs). Its kernels reach a lower share of the
# GEMM rate than plain GEMMs do (softmax between the two products): GPU.attention_efficiency.
CAUSAL = 0.5
FLASH_BACKWARD = 2.5
MEMORY_EFFICIENCY = 0.85
# Score-matrix traffic per element of the unfused (Megatron 2021) attention core, forward, besides the
# QKᵀ that writes it and the AV that reads it (counted with those GEMMs): the fused scale-mask-softmax
# reads it and writes probabilities, dropout reads them and writes the dropped ones and its byte mask.
# Backward moves about twice that.
UNFUSED_SCORE_PASSES = 4  # 16-bit elements, + the one-byte mask under attention dropout


@dataclass(frozen=True)
class TableCompute:
    gemm_rate: float  # FLOP/s large GEMMs sustain
    memory_rate: float  # bytes/s streaming kernels sustain
    act_bytes: int  # bytes per activation element (2: bf16/fp16, 4: fp32)
    attention_rate: float  # FLOP/s fused (flash) attention kernels sustain

    @classmethod
    def for_gpu(cls, gpu, precision: str) -> "TableCompute":
        rate = gpu.peak(precision) * gpu.gemm_efficiency
        return cls(rate, gpu.hbm * MEMORY_EFFICIENCY, 4 if precision == "fp32" else 2, rate * gpu.attention_efficiency)

    def gemm_s(self, g: Gemm) -> float:
        moved = (g.rows * g.inner + g.inner * g.cols + g.rows * g.cols) * self.act_bytes * g.count
        return g.flops / self.gemm_rate + moved / self.memory_rate

    def elementwise_s(self, nbytes: float) -> float:
        return nbytes / self.memory_rate

    def attention_s(self, m, seq: int, micro_batch: int, tp: int, flash: bool, dropout: bool) -> tuple[float, float]:
        """(forward, backward) seconds of the attention core of one layer on one TP rank."""
        heads, hd = m.n_heads // tp, m.head_dim
        if flash:
            fwd = CAUSAL * attention_flops(m, seq, micro_batch, tp) / self.attention_rate
            return fwd, FLASH_BACKWARD * fwd
        products = [Gemm("qk", seq, hd, seq, micro_batch * heads), Gemm("av", seq, seq, hd, micro_batch * heads)]
        scores = micro_batch * heads * seq * seq
        per_score = UNFUSED_SCORE_PASSES * self.act_bytes + (1 if dropout else 0)
        fwd = sum(self.gemm_s(g) for g in products) + scores * per_score / self.memory_rate
        return fwd, 2 * fwd
