"""GPUs and clusters the planner knows, and what a collective costs on them.

Peaks are NVIDIA's dense tensor-core figures (A100: 312 TFLOP/s bf16/fp16, 19.5 fp32 without TF32;
H100 SXM: 989 bf16/fp16, 67 fp32). Capacities and HBM bandwidths are the data sheets' (A100-40GB
1.555 TB/s, A100-80GB SXM 2.039 TB/s, H100 SXM 3.35 TB/s). ``gemm_efficiency`` is the fraction of
peak large GEMMs sustain and ``attention_efficiency`` the share of that fused attention reaches (fitted
values and their sources: compute.py); ``megadeep plan --calibrate`` measures all of these instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory: float  # bytes
    peak_16bit: float  # dense bf16/fp16 FLOP/s
    peak_fp32: float
    nvlink: float  # default NVLink bandwidth per GPU, one direction, bytes/s
    network: float  # default network bandwidth per node (all its NICs), one direction, bytes/s
    hbm: float = 2.0e12  # memory bandwidth, bytes/s
    gemm_efficiency: float = 0.8  # fraction of peak that large GEMMs sustain
    attention_efficiency: float = 0.75  # fraction of that GEMM rate fused (flash) attention kernels sustain

    def peak(self, precision: str) -> float:
        return self.peak_fp32 if precision == "fp32" else self.peak_16bit


GPUS = {
    # DGX A100: NVLink 3 (600 GB/s both directions), 8 × 200 Gb/s HDR InfiniBand per node
    "A100-40": GPU("A100-40", 40 * GiB, 312e12, 19.5e12, 300e9, 200e9, hbm=1.555e12, gemm_efficiency=0.75),
    "A100-80": GPU("A100-80", 80 * GiB, 312e12, 19.5e12, 300e9, 200e9, hbm=2.039e12, gemm_efficiency=0.75),
    # DGX H100: NVLink 4 (900 GB/s both directions), 8 × 400 Gb/s NDR InfiniBand per node
    "H100-80": GPU("H100-80", 80 * GiB, 989e12, 67e12, 450e9, 400e9, hbm=3.35e12, gemm_efficiency=0.69,
                       attention_efficiency=0.25),
}

# Fraction of a link's rate that NCCL's ring collectives sustain as bus bandwidth on large messages
# (nccl-tests on NVSwitch and InfiniBand systems report roughly 75-85%).
COMM_EFFICIENCY = 0.8
# Bytes moved per rank per byte of the tensor, ring algorithms over n ranks.
TRAFFIC = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
           "reduce_scatter": lambda n: (n - 1) / n, "p2p": lambda n: 1.0}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GPU
    intra: float  # bytes/s per GPU inside a node
    inter: float  # bytes/s per node across nodes
    host_memory: float = 1024 * GiB  # bytes of CPU memory per node (DGX A100: 1-2 TiB) for offloaded states
    # measured inside one node (``megadeep plan --calibrate``): op -> (bus bytes/s, seconds per call)
    measured: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def group_bandwidth(self, ranks: list[int], op: str = "all_reduce") -> float:
        """Bus bandwidth of a collective over ``ranks``. A group inside one node runs on NVLink (or at
        the calibrated rate of ``op``); one that spans nodes shares each node's NICs with the other
        groups of its kind: NCCL runs a ring per NIC, so a group with k members on a node gets
        k/gpus_per_node of the node's rate."""
        nodes = {self.node(r) for r in ranks}
        if len(nodes) == 1:
            return self.measured[op][0] if op in self.measured else self.intra * COMM_EFFICIENCY
        per_node = len(ranks) / len(nodes)
        return min(self.intra, self.inter * per_node / self.gpus_per_node) * COMM_EFFICIENCY

    def collective_time(self, op: str, nbytes: float, ranks: list[int]) -> float:
        """Seconds of one ``op`` on a tensor of ``nbytes`` over ``ranks`` (for p2p: the two ends)."""
        n = len(ranks)
        if n < 2 or nbytes <= 0:
            return 0.0
        latency = self.measured[op][1] if op in self.measured and len({self.node(r) for r in ranks}) == 1 else 0.0
        return latency + TRAFFIC[op](n) * nbytes / self.group_bandwidth(ranks, op)

