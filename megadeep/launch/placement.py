"""Which node holds which (TP, DP, PP) coordinates: planned before submission, reported by the ranks.

Launchers here place ranks in blocks — rank r on node ``r // per_node`` (srun ``--distribution=block``,
DeepSpeed's hostfile order, torchrun's node rank) — and the layout puts TP fastest
(:mod:`megadeep.parallel.layout`), so a TP group stays on one node exactly when it fits in a node's
block. TP all-reduces run once or twice per layer: across nodes they would crawl, so such a layout is
refused rather than run slowly.
"""
from __future__ import annotations

from megadeep.errors import ConfigError
from megadeep.parallel.layout import Layout


def node_of(rank: int, per_node: int) -> int:
    return rank // per_node


def check_placement(layout: Layout, nodes: int, per_node: int) -> None:
    """Refuse a TP group spanning nodes (the layout's world size already matches the allocation:
    :func:`megadeep.config.resolve` checks DP×TP×PP against it)."""
    assert layout.world_size == nodes * per_node, (layout, nodes, per_node)
    for group in layout.tp_groups():
        spanned = sorted({node_of(r, per_node) for r in group})
        if len(spanned) > 1:
            raise ConfigError(f"TP group of ranks {group[0]}-{group[-1]} (parallel.tp={layout.tp}) would span "
                              f"nodes {spanned} with {per_node} rank(s) per node; use a tp that divides {per_node}")


def planned_rank_map(layout: Layout, nodes: int, per_node: int) -> str:
    """The rank map as text, one line per node: ``node 0: rank 0 (tp=0 dp=0 pp=0), ...``."""
    lines = [f"rank map: {nodes} node(s) × {per_node} rank(s), TP={layout.tp} DP={layout.dp} PP={layout.pp} "
             f"(node i is the i-th host of the allocation)"]
    for n in range(nodes):
        ranks = range(n * per_node, (n + 1) * per_node)
        lines.append(f"  node {n}: " + ", ".join(_entry(r, *layout.coord(r)) for r in ranks))
    return "\n".join(lines)


def _entry(rank: int, tp: int, dp: int, pp: int) -> str:
    return f"rank {rank} (tp={tp} dp={dp} pp={pp})"


def report_actual(launcher: str) -> str:
    """Gather (node, TP/DP/PP rank from the live process groups) from every rank; rank 0 gets the map
    as text (with a warning for a TP group that spans nodes), the others get "". Collective."""
    import os
    import socket

    import torch.distributed as dist

    from megadeep.parallel import groups

    mine = (os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            groups.get_tensor_model_parallel_rank(), groups.get_data_parallel_rank(),
            groups.get_pipeline_model_parallel_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() != 0:
        return ""
    by_node: dict[str, list[str]] = {}
    for rank, (node, tp, dp, pp) in enumerate(everyone):
        by_node.setdefault(node, []).append(_entry(rank, tp, dp, pp))
    lines = [f"rank map ({launcher}): " + " | ".join(f"{node}: {', '.join(r)}" for node, r in by_node.items())]
    for group in groups.layout().tp_groups():
        nodes = sorted({everyone[r][0] for r in group})
        if len(nodes) > 1:
            lines.append(f"warning: TP group {group} spans nodes {nodes}; its all-reduces go over the network")
    return "\n".join(lines)
