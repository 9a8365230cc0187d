"""DeepSpeed's view of the DP×TP×PP grid, kept identical to megadeep's process groups.

``deepspeed.initialize`` refuses an ``mpu`` together with a ``PipelineModule``: the pipeline engine
builds its own groups from a topology. Our TP layers communicate over ``megadeep.parallel.groups``,
so the two must hold exactly the same ranks, or TP collectives and DeepSpeed's grad reduction and
checkpoint names would disagree silently.
"""
from __future__ import annotations

from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megadeep.parallel import groups
from megadeep.parallel.layout import Layout


def topology(layout: Layout) -> PipeModelDataParallelTopology:
    """Axes ``pipe, data, model`` with ``model`` (TP) fastest: ``rank = tp + dp·TP + pp·TP·DP``, our order.
    Under context parallelism the engine's data axis is our DP×CP (``cp + dp·CP``, again our order): the
    ranks whose gradients it reduces (averaging, so the CP loss share is scaled by cp; ``lm_loss``)."""
    return PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp * layout.cp)


def check_grid(grid) -> None:
    """Fail loudly unless the engine's grid and our groups agree for this rank."""
    mine = {
        "tensor": groups.get_tensor_model_parallel_group_ranks(),
        "data": groups.get_sequence_data_parallel_group_ranks(),
        "pipe": groups.get_pipeline_model_parallel_group_ranks(),
    }
    theirs = {"tensor": list(grid.slice_group), "data": list(grid.dp_group), "pipe": list(grid.pp_group)}
    if mine != theirs:
        raise RuntimeError(f"DeepSpeed's pipeline grid {theirs} disagrees with megadeep's groups {mine}")
