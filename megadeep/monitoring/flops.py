"""Model FLOPs per token and MFU.

Model FLOPs count the matmuls a training step must do, whatever recomputation the run adds
(PaLM's definition): per token, 6·N for the weight matmuls (2 forward, 4 backward) plus attention's
score and value products, 12·L·h·s (h = model width, s = sequence length). N counts parameters that take
part in a matmul: every decoder weight and the LM head (the tied embedding counts once, as the head);
an untied input embedding table is a lookup, not a matmul, and is left out. Norm weights are included
in N (a negligible overcount the formula traditionally makes).
"""
from __future__ import annotations

import time

import torch

from megadeep.config.schema import ModelConfig
from megadeep.model.llama import num_params

# Dense (no sparsity) peak FLOP/s per device, from the vendors' data sheets.
PEAK_FLOPS = {
    # name fragment: {precision: FLOP/s}; fp32 means TF32 tensor cores where torch allows them.
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}


def matmul_params(cfg: ModelConfig) -> int:
    n = num_params(cfg)
    return n if cfg.tie_embeddings else n - cfg.vocab_size * cfg.dim


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.dim * seq_len


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    for fragment, peaks in PEAK_FLOPS.items():  # ordered: "H100 PCIe" is tried before "H100"
        if fragment in device_name:
            return peaks.get(precision)
    return None


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an fp32 matmul with this process's threads, under whatever else runs beside it.

    Ranks measure at the same moment, so on a shared machine each rank's peak is its share.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    return measure_cpu_peak_flops()


def mfu(tokens_per_s_per_device: float, flops_per_tok: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_s_per_device * flops_per_tok / peak
