"""Predict per-GPU memory and step time of one training layout.

Step time = compute at a fixed achievable fraction of peak + the communication that does not
overlap it (TP all-reduces, pipeline sends, the pipeline bubble, DP/ZeRO collectives, offload
traffic and the CPU optimizer step). FLOPs are counted as Narayanan et al. 2021 do (eq. 3): the
matmuls of the transformer and the logit layer, 6 per parameter per token, plus attention's
12·L·h·s per token (QKᵀ and AV, no causal discount), plus one more forward of the layers under full
activation recomputation; that is also how published TFLOP/s figures count.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from megadeep.config.deepspeed import load_recipe, offload_devices, zero_stage
from megadeep.config.schema import ModelConfig
from megadeep.parallel.layout import Layout
from megadeep.planner.hardware import Cluster, GiB, all_gather_time, all_reduce_time
from megadeep.planner.memory import (
    DTYPE_BYTES,
    ActivationShape,
    layer_param_numels,
    model_states,
    persistent_numel,
    stage_activation_bytes,
    stage_param_numels,
)

# Fraction of peak FLOP/s that the compute of a training step achieves when nothing waits on
# communication: large GEMMs run at ~80% of peak on A100/H100, and they are about two thirds of
# the step's kernel time (the rest: norms, softmax, elementwise ops, the optimizer). One value for
# every model and layout, chosen once; tests/test_planner.py checks it against published runs.
ACHIEVABLE_FRACTION = 0.5
RESERVED = 2 * GiB  # CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation, per GPU
PCIE = 25e9  # bytes/s host<->GPU per GPU (PCIe 4.0 x16 in practice)
CPU_ADAM = 1e9  # parameters/s DeepSpeedCPUAdam updates per GPU's share of the host's cores
NVME = 3e9  # bytes/s per GPU to local NVMe for ZeRO-Infinity swaps


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    seq: int
    global_batch: int
    precision: str = "bf16"
    flash: bool = True  # fused attention kernels (no s×s activations)


@dataclass(frozen=True)
class Candidate:
    tp: int
    pp: int
    dp: int
    recipe: str  # a ds_configs/ name
    micro_batch: int
    recompute: str  # "selective" (no checkpointing; flash attention recomputes scores) | "full"
    sequence_parallel: bool = False
    virtual_stages: int = 1  # interleaved 1F1B chunks per GPU (DeepSpeed's engine: 1)
    scatter_gather: bool = False  # Megatron's pipeline send of 1/TP per rank + NVLink all-gather


@dataclass(frozen=True)
class Recipe:
    stage: int
    offload_optimizer: str
    offload_param: str
    reduce_bucket: int
    allgather_bucket: int
    prefetch_bucket: int
    persistence_threshold: int


@functools.lru_cache(maxsize=None)
def recipe_facts(name: str) -> Recipe:
    r = load_recipe(name)
    z = r.get("zero_optimization", {})
    opt, param = offload_devices(r)
    return Recipe(zero_stage(r), opt, param, int(z.get("reduce_bucket_size", 5e8)),
                  int(z.get("allgather_bucket_size", 5e8)), int(z.get("stage3_prefetch_bucket_size", 5e7)),
                  int(z.get("stage3_param_persistence_threshold", 1e5)))


@dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    micro_batches: int
    states: float  # bytes per GPU, the busiest pipeline stage
    activations: float
    buffers: float
    host: float  # bytes per GPU of host memory for CPU-offloaded states (NVMe capacity is not checked)
    compute_s: float
    bubble_s: float
    tp_s: float
    pp_s: float
    dp_s: float
    offload_s: float
    hardware_flops: float  # per step, whole model
    model_flops: float
    n_gpus: int
    peak: float

    @property
    def memory(self) -> float:
        return self.states + self.activations + self.buffers + RESERVED

    @property
    def step_s(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_s + self.pp_s + self.dp_s + self.offload_s

    @property
    def tflops_per_gpu(self) -> float:
        """Hardware FLOP/s per GPU (recomputation included), in TFLOP/s."""
        return self.hardware_flops / self.step_s / self.n_gpus / 1e12

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step_s / self.n_gpus / self.peak


def matmul_params(m: ModelConfig) -> tuple[int, int]:
    """(per-layer matmul parameters, logit-layer parameters) of the whole model (TP=1)."""
    return sum(layer_param_numels(m, 1)[:-2]), m.padded_vocab(1) * m.dim


def step_flops(m: ModelConfig, tokens: int, seq: int, recompute: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step over ``tokens`` tokens."""
    layer, head = matmul_params(m)
    layers_fwd = m.n_layers * (2 * layer + 4 * m.dim * seq) * tokens
    model = 3 * layers_fwd + 6 * head * tokens
    return model, model + (layers_fwd if recompute == "full" else 0)


def estimate(w: Workload, c: Candidate, cluster: Cluster) -> Estimate:
    m, r = w.model, recipe_facts(c.recipe)
    act_bytes = p_bytes = DTYPE_BYTES[w.precision]
    n_gpus = c.tp * c.pp * c.dp
    micro_batches = w.global_batch // (c.micro_batch * c.dp)
    tokens = w.global_batch * w.seq

    # --- memory of the first and the last pipeline stage, whichever is larger
    numels = stage_param_numels(m, c.tp, c.pp)
    shape = ActivationShape(w.seq, c.micro_batch, m, c.tp, c.sequence_parallel, w.flash, act_bytes=act_bytes)
    base, extra = divmod(m.n_layers, c.pp)
    best = None
    for i in {0, c.pp - 1}:
        n = sum(numels[i])
        states = model_states(n, r.stage, c.dp, w.precision, persistent_numel(numels[i], r.persistence_threshold))
        gpu_states, host = states.total, 0.0
        if r.offload_optimizer != "none":  # fp32 master, moments and fp32 gradient partition leave the GPU
            host = (states.optimizer + 4 * n / c.dp) if r.offload_optimizer == "cpu" else 0.0
            gpu_states -= states.optimizer + states.grads
        if r.offload_param != "none":
            host += states.params if r.offload_param == "cpu" else 0.0
            gpu_states -= states.params
        in_flight = min(c.pp - i, micro_batches)
        acts = stage_activation_bytes(shape, base + (i < extra), in_flight, c.recompute, i == 0, i == c.pp - 1)
        if best is None or gpu_states + acts > best[0] + best[1]:
            best = (gpu_states, acts, host, n)
    gpu_states, acts, host, n_stage = best
    buffers = 0.0
    if r.stage >= 1:
        buffers += r.reduce_bucket * p_bytes
    if r.stage in (1, 2):
        buffers += r.allgather_bucket * p_bytes
    if r.stage == 3:  # prefetched parameters and the largest layer gathered whole
        buffers += (r.prefetch_bucket + sum(layer_param_numels(m, c.tp))) * p_bytes

    # --- time
    model_flops, hw_flops = step_flops(m, tokens, w.seq, c.recompute)
    head_mm = matmul_params(m)[1]
    per_layer_hw = (hw_flops - 6 * head_mm * tokens) / m.n_layers
    slowest_stage = max(per_layer_hw * (base + (i < extra)) + (6 * head_mm * tokens if i == c.pp - 1 else 0)
                        for i in range(c.pp))
    peak = cluster.gpu.peak(w.precision)
    compute = slowest_stage / (c.tp * c.dp) / (peak * ACHIEVABLE_FRACTION)
    bubble = (c.pp - 1) / (micro_batches * c.virtual_stages) * compute

    layers = base + (extra > 0)
    act = w.seq * c.micro_batch * m.dim * act_bytes
    layout = Layout(tp=c.tp, dp=c.dp, pp=c.pp)  # megadeep's rank order decides which groups cross nodes
    tp_bw = cluster.group_bandwidth(layout.tp_groups()[0])
    collectives = 6 if c.recompute == "full" else 4  # 2 per sublayer pass: forward, backward (+ recompute)
    tp_time = layers * micro_batches * collectives * all_reduce_time(act, c.tp, tp_bw)

    pp_time = 0.0
    if c.pp > 1:
        send = act / (c.tp if c.scatter_gather else 1)
        stages = layout.pp_groups()[0]
        slowest_link = min(cluster.p2p_bandwidth(a, b) for a, b in zip(stages, stages[1:]))
        pp_time = 2 * micro_batches * c.virtual_stages * send / slowest_link

    dp_bw = cluster.group_bandwidth(layout.dp_groups()[0])
    grads = n_stage * p_bytes
    shard = all_gather_time(grads, c.dp, dp_bw)  # one reduce-scatter or all-gather of the stage's params
    if r.stage <= 1:  # gradients reduced after backward (ZeRO-1: reduce-scatter, then params all-gathered)
        dp_time = 2 * shard
    elif r.stage == 2:  # the reduce-scatter overlaps backward (2/3 of compute); the all-gather after the step not
        dp_time = shard + max(0.0, shard - compute * 2 / 3)
    else:  # params gathered for forward and backward, grads reduce-scattered, every micro-batch. Counted
        # as not overlapped: DeepSpeed prefetches, but Narayanan et al. (Table 2) measured ZeRO-3 losing
        # 40-70% of its throughput when its data-parallel size doubled, worse than even this assumption.
        dp_time = micro_batches * 3 * shard

    offload = 0.0
    if r.offload_optimizer != "none":
        partition = n_stage / (c.dp if r.stage >= 1 else 1)
        link = NVME if r.offload_optimizer == "nvme" else PCIE
        offload += partition / CPU_ADAM + partition * (4 + p_bytes) / PCIE  # Adam on CPU, grads down, params up
        if r.offload_optimizer == "nvme":
            offload += partition * 12 * 2 / link  # moments and master read and written back
    if r.offload_param != "none":
        link = NVME if r.offload_param == "nvme" else PCIE
        offload += max(0.0, micro_batches * 2 * n_stage * p_bytes / link - compute)

    return Estimate(c, micro_batches, gpu_states, acts, buffers, host, compute, bubble, tp_time, pp_time,
                    dp_time, offload, hw_flops, model_flops, n_gpus, peak)
