"""Predict per-GPU memory and step time of one training layout.

Step time = the slowest pipeline stage's kernels (compute.py: from the GEMM shapes a rank runs, the
attention core and the memory-bound kernels) + the extra forward of recomputation + the pipeline
bubble + the communication the runtime does not overlap with compute + the optimizer step and any
offload traffic. What overlaps is what the run the planner writes does: DeepSpeed's ``overlap_comm``
(read from the ds_config recipe) hides ZeRO's gradient reduce-scatter behind backward, never under the
pipeline engine (it reduces after the flush); TP collectives are exposed (megadeep's layers run them
synchronously) unless a candidate asks for ``tp_overlap``; pipeline p2p is blocking in DeepSpeed's
engine, hence exposed. FLOPs come from megadeep.model.accounting, the trainer's MFU formula; the
TFLOP/s column counts hardware FLOPs (recomputation included), as published figures do.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from megadeep.config.deepspeed import LAYER_SIZED, load_recipe, offload_devices, zero_stage
from megadeep.config.schema import ModelConfig
from megadeep.model.accounting import (
    backward_gemms,
    cp_attention_bytes,
    elementwise_bytes,
    flops_per_token,
    head_gemm,
    layer_gemms,
    recompute_flops_per_token,
)
from megadeep.pipeline.partition import stage_layers
from megadeep.parallel.cp_choice import pick
from megadeep.parallel.layout import Layout
from megadeep.planner.compute import TableCompute
from megadeep.planner.hardware import Cluster, GiB
from megadeep.planner.memory import (
    DTYPE_BYTES,
    ActivationShape,
    layers_param_numels,
    model_states,
    persistent_numel,
    stage_activation_bytes,
    stage_param_numels,
)

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
    partition_method: str = "parameters"  # parallel.partition_method: how DeepSpeed cuts the stages
    # The MLP is GPT's GeLU one (fc1 → GeLU → fc2) with as many parameters as ``model``'s SwiGLU, i.e. of
    # width 3/2·hidden_ffn: the published GPT-3 / BLOOM / MPT runs tests/test_planner.py checks, modelled
    # by a SwiGLU of equal parameters and FLOPs. Only activations differ: GeLU keeps its input and output
    # (2 × 3/2·f per token), SwiGLU gate|up, silu(gate) and the product (4·f). megadeep's model: False.
    gelu_mlp: bool = False

    def activation_model(self) -> ModelConfig:
        """The model whose MLP width ``ActivationShape`` counts (GeLU's own width under ``gelu_mlp``)."""
        return replace(self.model, ffn_dim=self.model.hidden_ffn * 3 // 2) if self.gelu_mlp else self.model


@dataclass(frozen=True)
class Candidate:
    tp: int
    pp: int
    dp: int
    recipe: str  # a ds_configs/ name
    micro_batch: int
    recompute: str  # "selective" (no checkpointing; flash attention recomputes scores) | "full"
    sequence_parallel: bool = False
    # Interleaved 1F1B (Narayanan et al. 2021 §2.2.2): v model chunks per GPU, bubble (p-1)/(v·m),
    # v times the p2p. A model of Megatron's schedule only: DeepSpeed's pipeline engine, which megadeep
    # runs, has no interleaving, so ``megadeep plan`` never proposes v > 1.
    virtual_stages: int = 1
    tp_overlap: bool = False  # TP collectives chunked under the GEMMs (Megatron-Core); megadeep: no
    cp: int = 1  # context parallel: each rank holds seq/cp of every sequence (attention: parallel.cp_attention=auto)
    ep: int = 1  # MoE experts sharded over ep DP ranks (megadeep.parallel.layout)


@dataclass(frozen=True)
class Recipe:
    stage: int
    offload_optimizer: str
    offload_param: str
    reduce_bucket: int | None  # None: "auto", one layer (config.deepspeed.LAYER_SIZED)
    allgather_bucket: int
    prefetch_bucket: int | None
    persistence_threshold: int
    overlap_comm: bool


def _size(zero: dict, key: str, default: float) -> int | None:
    """A bucket size in elements; None for "auto" (``config.deepspeed.layer_sized``: one layer's worth)."""
    v = zero.get(key, default)
    return None if v == "auto" else int(v)


@functools.lru_cache(maxsize=None)
def recipe_facts(name: str) -> Recipe:
    r = load_recipe(name)
    z = r.get("zero_optimization", {})
    opt, param = offload_devices(r)
    stage = zero_stage(r)
    return Recipe(stage, opt, param, _size(z, "reduce_bucket_size", 5e8),
                  int(z.get("allgather_bucket_size", 5e8)), _size(z, "stage3_prefetch_bucket_size", 5e7),
                  int(z.get("stage3_param_persistence_threshold", 1e5)),
                  bool(z.get("overlap_comm", stage == 3)))  # DeepSpeed's default: on for stage 3 only


@dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    micro_batches: int
    states: float  # bytes per GPU, the busiest pipeline stage
    activations: float
    buffers: float
    host: float  # bytes per GPU of host memory for CPU-offloaded states (NVMe capacity is not checked)
    compute_s: float  # forward and backward kernels of the slowest stage, all micro-batches
    recompute_s: float  # the extra forward of full recomputation (and selective's attention)
    bubble_s: float
    tp_s: float  # exposed (not overlapped) communication of each kind
    pp_s: float
    dp_s: float
    offload_s: float
    optimizer_s: float  # the optimizer step and bf16's fp32 gradient accumulation
    hardware_flops: float  # per step, whole model
    model_flops: float
    n_gpus: int
    peak: float

    @property
    def memory(self) -> float:
        return self.states + self.activations + self.buffers + RESERVED

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.recompute_s + self.bubble_s + self.tp_s + self.pp_s + self.dp_s
                + self.offload_s + self.optimizer_s)

    @property
    def tflops_per_gpu(self) -> float:
        """Hardware FLOP/s per GPU (recomputation included), in TFLOP/s."""
        return self.hardware_flops / self.step_s / self.n_gpus / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs (megadeep.model.accounting.flops_per_token, the trainer's MFU formula) per
        second per GPU over the GPU's peak."""
        return self.model_flops / self.step_s / self.n_gpus / self.peak

    def breakdown(self) -> dict:
        """Where the predicted step time and memory go (the table and JSON of ``megadeep plan``)."""
        c = self.candidate
        return {"layout": {"tp": c.tp, "cp": c.cp, "pp": c.pp, "dp": c.dp, "recipe": c.recipe, "micro_batch": c.micro_batch,
                           "micro_batches": self.micro_batches, "recompute": c.recompute,
                           "sequence_parallel": c.sequence_parallel, "virtual_stages": c.virtual_stages,
                           "tp_overlap": c.tp_overlap},
                "time_s": {"compute": self.compute_s, "recompute": self.recompute_s, "bubble": self.bubble_s,
                           "tp_exposed": self.tp_s, "pp_exposed": self.pp_s, "dp_exposed": self.dp_s,
                           "optimizer": self.optimizer_s, "offload": self.offload_s, "step": self.step_s},
                "memory_bytes": {"model_states": self.states, "activations": self.activations,
                                 "buffers": self.buffers, "reserved": RESERVED, "total": self.memory,
                                 "host": self.host},
                "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu}


def step_flops(m: ModelConfig, tokens: int, seq: int, recompute: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step over ``tokens`` tokens."""
    model = flops_per_token(m, seq) * tokens
    return model, model + recompute_flops_per_token(m, seq, recompute) * tokens


@dataclass(frozen=True)
class StageTime:
    """Seconds of one micro-batch on one pipeline stage's rank."""

    forward: float
    backward: float
    recompute: float
    gemm: float  # the weight matmuls among the above (what overlapped TP communication can hide behind)


def stage_time(w: Workload, c: Candidate, comp, layers: int, last: bool) -> StageTime:
    m, tokens = w.model, c.micro_batch * w.seq // c.cp  # this rank's tokens
    gemms = layer_gemms(m, tokens, c.tp)
    g_fwd = sum(comp.gemm_s(g) for g in gemms)
    g_bwd = sum(comp.gemm_s(b) for g in gemms for b in backward_gemms(g))
    elem = comp.elementwise_s(elementwise_bytes(m, tokens, c.tp, c.sequence_parallel, comp.act_bytes))
    a_fwd, a_bwd = comp.attention_s(m, w.seq, c.micro_batch, c.tp, w.flash, m.attention_dropout > 0)
    a_fwd, a_bwd = a_fwd / c.cp, a_bwd / c.cp  # zig-zag CP: each rank computes 1/cp of the causal pairs
    fwd, bwd = layers * (g_fwd + a_fwd + elem), layers * (g_bwd + a_bwd + 2 * elem)
    recompute = layers * (g_fwd + a_fwd + elem if c.recompute == "full" else 0 if w.flash else a_fwd)
    gemm = layers * (g_fwd * (2 if c.recompute == "full" else 1) + g_bwd)
    if last:  # LM head and the fp32 cross-entropy over this rank's vocabulary slice
        head = head_gemm(m, tokens, c.tp)
        h_fwd, h_bwd = comp.gemm_s(head), sum(comp.gemm_s(b) for b in backward_gemms(head))
        loss = comp.elementwise_s(3 * 4 * tokens * head.cols)
        fwd, bwd, gemm = fwd + h_fwd + loss, bwd + h_bwd + loss, gemm + h_fwd + h_bwd
    return StageTime(fwd, bwd, recompute, gemm)


def adam_bytes_moved(precision: str) -> int:
    """Bytes Adam reads and writes per parameter of its partition in one step: fp32 master (or the
    fp32 parameter), momentum and variance read and written, the gradient read, and in mixed precision
    the 16-bit parameter written back."""
    return 3 * 8 + 4 + (0 if precision == "fp32" else 2)


def estimate(w: Workload, c: Candidate, cluster: Cluster, compute=None) -> Estimate:
    """Memory and step time of layout ``c``; ``compute`` answers kernel times (TableCompute of the
    cluster's GPU unless a Calibration is given)."""
    m, r = w.model, recipe_facts(c.recipe)
    comp = compute or TableCompute.for_gpu(cluster.gpu, w.precision)
    act_bytes = p_bytes = DTYPE_BYTES[w.precision]
    n_gpus = c.tp * c.pp * c.dp * c.cp
    zero_ranks = c.dp * c.cp  # ZeRO shards and reduces over DP×CP (CP ranks hold the same weights)
    cp_method = pick("auto", m.kv_heads // c.tp, c.cp)
    micro_batches = w.global_batch // (c.micro_batch * c.dp)
    tokens = w.global_batch * w.seq
    layers = stage_layers(m, c.tp, c.pp, w.partition_method)

    # --- memory of each pipeline stage's ranks; the busiest decides
    numels = stage_param_numels(m, c.tp, c.pp, w.partition_method, c.ep)
    shape = ActivationShape(w.seq, c.micro_batch, w.activation_model(), c.tp, c.sequence_parallel, w.flash,
                            gated_mlp=not w.gelu_mlp, act_bytes=act_bytes,
                            cp=c.cp, cp_gathers_kv=cp_method == "allgather")
    best = None
    for i in range(c.pp):
        n = sum(numels[i])
        states = model_states(n, r.stage, zero_ranks, w.precision, persistent_numel(numels[i], r.persistence_threshold),
                              r.offload_optimizer)
        gpu_states, host = states.total, 0.0
        if r.offload_optimizer != "none":  # fp32 master, moments and fp32 gradient partition leave the GPU
            host = (states.optimizer + 4 * n / zero_ranks) if r.offload_optimizer == "cpu" else 0.0
            gpu_states -= states.optimizer + states.grads
        if r.offload_param != "none":
            host += states.params if r.offload_param == "cpu" else 0.0
            gpu_states -= states.params
        in_flight = min(c.pp - i, micro_batches)
        acts = stage_activation_bytes(shape, layers[i], in_flight, c.recompute, i == 0, i == c.pp - 1)
        if best is None or gpu_states + acts > best[0] + best[1]:
            best = (gpu_states, acts, host)
    gpu_states, acts, host = best
    n_stage = max(sum(s) for s in numels)
    buffers = 0.0
    layer = max(map(sum, layers_param_numels(m, c.tp, c.ep)))
    if r.stage >= 1:
        buffers += (layer * LAYER_SIZED["reduce_bucket_size"] if r.reduce_bucket is None else r.reduce_bucket) * p_bytes
    if r.stage in (1, 2):
        buffers += r.allgather_bucket * p_bytes
    if r.stage == 3:  # prefetched parameters and the largest layer gathered whole
        prefetch = layer * LAYER_SIZED["stage3_prefetch_bucket_size"] if r.prefetch_bucket is None else r.prefetch_bucket
        buffers += (prefetch + layer) * p_bytes

    # --- compute: the slowest stage, per micro-batch
    times = [stage_time(w, c, comp, layers[i], i == c.pp - 1) for i in range(c.pp)]
    slow = max(times, key=lambda t: t.forward + t.backward + t.recompute)
    compute = micro_batches * (slow.forward + slow.backward)
    recompute = micro_batches * slow.recompute

    # --- tensor parallel: per sublayer pass an all-reduce, or (sequence parallel) an all-gather and a
    # reduce-scatter, of the layer's activation; forward, backward and the recomputed forward
    layout = Layout(tp=c.tp, dp=c.dp, pp=c.pp, cp=c.cp)  # megadeep's rank order decides which groups cross nodes
    tp_group = layout.tp_groups()[0]
    act = w.seq // c.cp * c.micro_batch * m.dim * act_bytes
    if c.sequence_parallel:
        per_pass = cluster.collective_time("all_gather", act, tp_group) + cluster.collective_time("reduce_scatter", act, tp_group)
    else:
        per_pass = cluster.collective_time("all_reduce", act, tp_group)
    passes = 2 * (3 if c.recompute == "full" else 2)
    tp_mb = (max(layers) * passes + 2) * per_pass  # + the LM head's input (forward) and its gradient
    if c.tp_overlap:  # chunked with the adjacent GEMMs (Megatron-Core's tp_comm_overlap): only the excess shows
        tp_mb = max(0.0, tp_mb - slow.gemm)
    tp_time = micro_batches * tp_mb
    # context parallel: the attention's all-to-alls (Ulysses) or K/V all-gather, not overlapped; forward,
    # backward and the recomputed forward (counted with the TP time: both are in-layer collectives)
    if c.cp > 1:
        received = cp_attention_bytes(m, w.seq, c.micro_batch, c.tp, c.cp, cp_method, act_bytes)
        cp_group = layout.cp_groups()[0]
        n = len(cp_group)
        # an all-to-all moves (n-1)/n of its tensor per rank like an all-gather: priced as one, whole tensor
        tensor = received * n / (n - 1)
        tp_time += micro_batches * max(layers) * passes * cluster.collective_time("all_gather", tensor, cp_group) / 2

    # --- pipeline: blocking sends of each micro-batch's activation forward and its gradient back, per
    # model chunk. Sequence-parallel activations are already 1/TP per rank; otherwise DeepSpeed's engine
    # (pipe_partitioned, as megadeep composes it) sends 1/TP and all-gathers it over TP on arrival.
    pp_time, bubble = 0.0, 0.0
    if c.pp > 1:
        stages = layout.pp_groups()[0]
        send = act / c.tp
        hop = max(cluster.collective_time("p2p", send, [a, b]) for a, b in zip(stages, stages[1:]))
        if c.tp > 1 and not c.sequence_parallel:
            hop += cluster.collective_time("all_gather", act, tp_group)
        pp_time = 2 * micro_batches * c.virtual_stages * hop
        # 1F1B: (p-1) micro-batch slots of idle time, 1/v of that with v interleaved chunks per GPU
        per_mb = (compute + recompute + tp_time + pp_time) / micro_batches
        bubble = (c.pp - 1) / c.virtual_stages * per_mb

    # --- data parallel / ZeRO, overlapped with backward where the runtime does (DeepSpeed's overlap_comm;
    # never under the pipeline engine, which reduces after the flush)
    dp_group = layout.dp_cp_groups()[0]
    grads = n_stage * p_bytes
    rs = cluster.collective_time("reduce_scatter", grads, dp_group)
    ag = cluster.collective_time("all_gather", grads, dp_group)
    overlap = r.overlap_comm and c.pp == 1
    backward = slow.backward + slow.recompute
    if r.stage == 0:  # the engine all-reduces after the last backward
        dp_time = cluster.collective_time("all_reduce", grads, dp_group)
    elif r.stage == 1:  # reduce-scatter at the accumulation boundary, parameters all-gathered after the step
        dp_time = (max(0.0, rs - backward) if overlap else rs) + ag
    elif r.stage == 2:  # gradients reduce-scattered in every micro-batch's backward
        dp_time = micro_batches * (max(0.0, rs - backward) if overlap else rs) + ag
    else:  # parameters gathered for forward and backward, gradients reduce-scattered, every micro-batch
        per_mb = ag * 2 + rs
        dp_time = micro_batches * (max(0.0, per_mb - (slow.forward + backward)) if overlap else per_mb)

    # --- optimizer step and offload traffic
    partition = n_stage / (zero_ranks if r.stage >= 1 else 1)
    optimizer = 0.0 if r.offload_optimizer != "none" else comp.elementwise_s(partition * adam_bytes_moved(w.precision))
    if w.precision == "bf16" and r.stage <= 1:  # DeepSpeed's BF16_Optimizer adds every micro-batch's bf16
        # gradients into fp32 accumulators (read both, write fp32)
        optimizer += micro_batches * comp.elementwise_s(n_stage * (p_bytes + 8))
    offload = 0.0
    if r.offload_optimizer != "none":
        link = NVME if r.offload_optimizer == "nvme" else PCIE
        offload += partition / CPU_ADAM + partition * (4 + p_bytes) / PCIE  # Adam on CPU, grads down, params up
        if r.offload_optimizer == "nvme":
            offload += partition * 12 * 2 / link  # moments and master read and written back
    if r.offload_param != "none":
        link = NVME if r.offload_param == "nvme" else PCIE
        offload += max(0.0, micro_batches * 2 * n_stage * p_bytes / link - compute)

    model_flops, hw_flops = step_flops(m, tokens, w.seq, c.recompute)
    return Estimate(c, micro_batches, gpu_states, acts, buffers, host, compute, recompute, bubble, tp_time, pp_time,
                    dp_time, offload, optimizer, hw_flops, model_flops, n_gpus, cluster.gpu.peak(w.precision))

