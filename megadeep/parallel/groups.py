"""The process groups of a TP×CP×DP×PP run — the only global state in megadeep.

The module itself is what we hand DeepSpeed as ``mpu``: it answers the Megatron-style getters
DeepSpeed asks for. In DeepSpeed's vocabulary "model parallel" means tensor parallel (it dedups
TP-replicated parameters in the grad norm and names checkpoint shards ``mp_rank_XX`` by it), and
"sequence parallel" means our context parallel (Ulysses): DeepSpeed reduces gradients and shards ZeRO
states over the "sequence data parallel" group (our DP×CP), averaging over DP and summing over CP.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megadeep.parallel.layout import Layout


@dataclass
class _Groups:
    layout: Layout
    rank: int
    tp: dist.ProcessGroup
    dp: dist.ProcessGroup
    pp: dist.ProcessGroup
    tp_ranks: list[int]
    dp_ranks: list[int]
    pp_ranks: list[int]
    tp_bytes: Counter = field(default_factory=Counter)  # payload bytes per TP collective type
    cp: dist.ProcessGroup | None = None  # context parallel (None at CP=1)
    cp_ranks: list[int] = field(default_factory=list)
    dp_cp: dist.ProcessGroup | None = None  # DP×CP (the DP group at CP=1)
    dp_cp_ranks: list[int] = field(default_factory=list)
    ep: dist.ProcessGroup | None = None  # expert parallel (None: EP=1, or simulated)
    edp: dist.ProcessGroup | None = None  # expert data parallel
    ep_ranks: list[int] = field(default_factory=list)
    edp_ranks: list[int] = field(default_factory=list)
    a2a_bytes: Counter = field(default_factory=Counter)  # payload bytes of expert all-to-alls


_STATE: _Groups | None = None


def _mine(groups: list[list[int]], rank: int) -> tuple[dist.ProcessGroup, list[int]]:
    """Create every group (all ranks must call new_group for each, in order) and keep ours."""
    found = None
    for ranks in groups:
        g = dist.new_group(ranks)
        if rank in ranks:
            found = (g, ranks)
    assert found is not None
    return found


def initialize(layout: Layout) -> None:
    """Build TP, DP and PP groups for ``layout``. torch.distributed must already be initialised."""
    global _STATE
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call megadeep.launch.env.init_distributed first")
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"layout {layout} needs {layout.world_size} ranks, world has {dist.get_world_size()}")
    destroy()
    rank = dist.get_rank()
    tp, tp_ranks = _mine(layout.tp_groups(), rank)
    dp, dp_ranks = _mine(layout.dp_groups(), rank)
    pp, pp_ranks = _mine(layout.pp_groups(), rank)
    _STATE = _Groups(layout, rank, tp, dp, pp, tp_ranks, dp_ranks, pp_ranks)
    if layout.cp > 1:
        _STATE.cp, _STATE.cp_ranks = _mine(layout.cp_groups(), rank)
        _STATE.dp_cp, _STATE.dp_cp_ranks = _mine(layout.dp_cp_groups(), rank)
    else:
        _STATE.cp_ranks, _STATE.dp_cp, _STATE.dp_cp_ranks = [rank], dp, dp_ranks
    _STATE.ep, _STATE.ep_ranks = _mine(layout.ep_groups(), rank)
    _STATE.edp, _STATE.edp_ranks = _mine(layout.expert_dp_groups(), rank)


@contextlib.contextmanager
def simulate(layout: Layout, rank: int):
    """Answer the getters as rank ``rank`` of ``layout`` would, without torch.distributed or any group
    (``--dry-run`` builds that rank's model on the meta device). Collectives would fail: none run."""
    global _STATE
    if _STATE is not None:
        raise RuntimeError("process groups are initialised: a simulated rank would shadow them")
    _STATE = _Groups(layout, rank, None, None, None, *(next(g for g in groups(layout) if rank in g)
                                                       for groups in (Layout.tp_groups, Layout.dp_groups, Layout.pp_groups)))
    _STATE.cp_ranks = next(g for g in layout.cp_groups() if rank in g)
    _STATE.dp_cp_ranks = next(g for g in layout.dp_cp_groups() if rank in g)
    _STATE.ep_ranks, _STATE.edp_ranks = (next(g for g in groups(layout) if rank in g)
                                         for groups in (Layout.ep_groups, Layout.expert_dp_groups))
    try:
        yield
    finally:
        _STATE = None


def is_initialized() -> bool:
    return _STATE is not None


def destroy() -> None:
    global _STATE
    if _STATE is not None and dist.is_initialized():
        for g in (_STATE.tp, _STATE.dp, _STATE.pp, _STATE.ep, _STATE.edp) + ((_STATE.cp, _STATE.dp_cp) if _STATE.cp else ()):
            if g is not None:
                dist.destroy_process_group(g)
    _STATE = None


def _state() -> _Groups:
    if _STATE is None:
        raise RuntimeError("megadeep process groups are not initialised (megadeep.parallel.groups.initialize)")
    return _STATE


def layout() -> Layout:
    return _state().layout


def coord():
    s = _state()
    return s.layout.coord(s.rank)


# Tensor parallel.
def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    return _state().tp


def get_tensor_model_parallel_world_size() -> int:
    return _state().layout.tp if _STATE is not None else 1


def get_tensor_model_parallel_rank() -> int:
    return coord().tp if _STATE is not None else 0


def get_tensor_model_parallel_src_rank() -> int:
    return _state().tp_ranks[0]


def get_tensor_model_parallel_group_ranks() -> list[int]:
    return list(_state().tp_ranks)


# DeepSpeed's "model parallel" is our tensor parallel.
get_model_parallel_group = get_tensor_model_parallel_group
get_model_parallel_world_size = get_tensor_model_parallel_world_size
get_model_parallel_rank = get_tensor_model_parallel_rank


# Data parallel.
def get_data_parallel_group() -> dist.ProcessGroup:
    return _state().dp


def get_data_parallel_world_size() -> int:
    return _state().layout.dp if _STATE is not None else 1


def get_data_parallel_rank() -> int:
    return coord().dp if _STATE is not None else 0


def get_data_parallel_group_ranks() -> list[int]:
    return list(_state().dp_ranks)


# Pipeline parallel.
def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
    return _state().pp


def get_pipeline_model_parallel_world_size() -> int:
    return _state().layout.pp if _STATE is not None else 1


def get_pipeline_model_parallel_rank() -> int:
    return coord().pp if _STATE is not None else 0


def get_pipeline_model_parallel_group_ranks() -> list[int]:
    return list(_state().pp_ranks)


# Context parallel. DeepSpeed calls it "sequence parallel" (Ulysses) and asks for these by name.
def get_context_parallel_group() -> dist.ProcessGroup | None:
    return _state().cp


def get_context_parallel_world_size() -> int:
    return _state().layout.cp if _STATE is not None else 1


def get_context_parallel_rank() -> int:
    s = _STATE
    return s.layout.cp_index(s.rank) if s is not None else 0


def get_context_parallel_group_ranks() -> list[int]:
    return list(_state().cp_ranks)


get_sequence_parallel_group = get_context_parallel_group
get_sequence_parallel_world_size = get_context_parallel_world_size
get_sequence_parallel_rank = get_context_parallel_rank


def get_sequence_data_parallel_group() -> dist.ProcessGroup:
    """DP×CP: the ranks holding the same weights (gradient reduction, ZeRO partitioning)."""
    return _state().dp_cp


def get_sequence_data_parallel_group_ranks() -> list[int]:
    return list(_state().dp_cp_ranks)


def get_sequence_data_parallel_world_size() -> int:
    s = _STATE
    return s.layout.dp * s.layout.cp if s is not None else 1


def get_sequence_data_parallel_rank() -> int:
    s = _state()
    return s.dp_cp_ranks.index(s.rank)


def count_tp_bytes(op: str, nbytes: int) -> None:
    """Record a TP collective's payload (the full tensor it reduces or gathers). Not while torch.compile
    traces (a dict mutated inside an autograd function breaks the graph): log.comm_stats needs eager."""
    if not torch.compiler.is_compiling():
        _state().tp_bytes[op] += nbytes


def take_tp_bytes() -> dict[str, int]:
    """TP payload bytes per collective type since the last call."""
    counts = dict(_state().tp_bytes)
    _state().tp_bytes.clear()
    return counts


# Expert parallel (a subdivision of DP, see ``Layout.ep_groups``).
def get_expert_parallel_group() -> dist.ProcessGroup:
    return _state().ep


def get_expert_parallel_world_size() -> int:
    return _state().layout.ep if _STATE is not None else 1


def get_expert_parallel_rank() -> int:
    return _state().layout.ep_rank(_STATE.rank) if _STATE is not None else 0


def get_expert_parallel_group_ranks() -> list[int]:
    return list(_state().ep_ranks)


def get_expert_data_parallel_group() -> dist.ProcessGroup:
    return _state().edp


def get_expert_data_parallel_group_ranks() -> list[int]:
    return list(_state().edp_ranks)


def count_a2a_bytes(nbytes: int) -> None:
    """Record an expert all-to-all's payload (what this rank sends to other ranks)."""
    if _STATE is not None:
        _STATE.a2a_bytes["all_to_all"] += nbytes


def take_a2a_bytes() -> int:
    """Expert all-to-all payload bytes since the last call."""
    n = _state().a2a_bytes["all_to_all"]
    _state().a2a_bytes.clear()
    return n
