"""MFU: model FLOPs per token (counted in megadeep.model.accounting, the formula the planner
predicts with) against the device's peak.
"""
from __future__ import annotations

import time

import torch

from megadeep.model.accounting import flops_per_token  # noqa: F401  (MFU's numerator, re-exported)

# Dense (no sparsity) peak FLOP/s per device, from the vendors' data sheets.
PEAK_FLOPS = {
    # name fragment: {precision: FLOP/s}; fp32 means TF32 tensor cores where torch allows them.
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}


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
