"""GPUs and clusters the planner knows, and what a collective costs on them.

Peaks are NVIDIA's dense tensor-core figures (A100: 312 TFLOP/s bf16/fp16, 19.5 fp32 without TF32;
H100 SXM: 989 bf16/fp16, 67 fp32). Capacities are the HBM sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory: float  # bytes
    peak_16bit: float  # dense bf16/fp16 FLOP/s
    peak_fp32: float
    nvlink: float  # default NVLink bandwidth per GPU, one direction, bytes/s
    network: float  # default network bandwidth per node (all its NICs), one direction, bytes/s

    def peak(self, precision: str) -> float:
        return self.peak_fp32 if precision == "fp32" else self.peak_16bit


GPUS = {
    # DGX A100: NVLink 3 (600 GB/s both directions), 8 × 200 Gb/s HDR InfiniBand per node
    "A100-40": GPU("A100-40", 40 * GiB, 312e12, 19.5e12, 300e9, 200e9),
    "A100-80": GPU("A100-80", 80 * GiB, 312e12, 19.5e12, 300e9, 200e9),
    # DGX H100: NVLink 4 (900 GB/s both directions), 8 × 400 Gb/s NDR InfiniBand per node
    "H100-80": GPU("H100-80", 80 * GiB, 989e12, 67e12, 450e9, 400e9),
}

# Fraction of a link's rate that NCCL's ring collectives sustain as bus bandwidth on large messages
# (nccl-tests on NVSwitch and InfiniBand systems report roughly 75-85%).
COMM_EFFICIENCY = 0.8


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GPU
    intra: float  # bytes/s per GPU inside a node
    inter: float  # bytes/s per node across nodes
    host_memory: float = 1024 * GiB  # bytes of CPU memory per node (DGX A100: 1-2 TiB) for offloaded states

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def group_bandwidth(self, ranks: list[int]) -> float:
        """Bus bandwidth of a collective over ``ranks``. A group inside one node runs on NVLink; one
        that spans nodes shares each node's NICs with the other groups of its kind: NCCL runs a ring
        per NIC, so a group with k members on a node gets k/gpus_per_node of the node's rate."""
        nodes = {self.node(r) for r in ranks}
        if len(nodes) == 1:
            return self.intra * COMM_EFFICIENCY
        per_node = len(ranks) / len(nodes)
        return min(self.intra, self.inter * per_node / self.gpus_per_node) * COMM_EFFICIENCY

    def p2p_bandwidth(self, src: int, dst: int) -> float:
        """Point-to-point (pipeline neighbours): NVLink inside a node, else this GPU's NIC share."""
        if self.node(src) == self.node(dst):
            return self.intra * COMM_EFFICIENCY
        return min(self.intra, self.inter / self.gpus_per_node) * COMM_EFFICIENCY


def all_reduce_time(nbytes: float, size: int, bandwidth: float) -> float:
    return 2 * (size - 1) / size * nbytes / bandwidth if size > 1 else 0.0


def all_gather_time(nbytes: float, size: int, bandwidth: float) -> float:
    """All-gather (or reduce-scatter) of a ``nbytes`` tensor assembled from ``size`` shards."""
    return (size - 1) / size * nbytes / bandwidth if size > 1 else 0.0
