"""Per-GPU memory of a training layout: model states (ZeRO); parameters per rank and activations
are counted in megadeep.model.accounting (re-exported here: the planner's memory API).

Model states follow the ZeRO paper (Rajbhandari et al. 2020, §3.1 and §5): with Ψ parameters on a
rank and mixed-precision Adam, 2Ψ bytes of parameters + 2Ψ of gradients + KΨ of optimizer states
(K = 12: fp32 master copy, momentum, variance); ZeRO stage 1 divides the optimizer term by the
data-parallel degree N_d, stage 2 also the gradients, stage 3 also the parameters. In fp32 training
Adam needs no master copy (K = 8), but DeepSpeed's stage 1/2 optimizers and an offloaded optimizer
clone the fp32 partition anyway, so K = 12 there; stage 3 without optimizer offload uses the
partition itself (once megadeep.training.ds_fixes works around DeepSpeed 0.19's device comparison):
the formula follows what DeepSpeed allocates (measured by ``megadeep memory``, see
tests/test_ds_configs.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from megadeep.model.accounting import (  # noqa: F401  (the planner's memory API, one accounting)
    ActivationShape,
    expert_param_numel,
    layer_activation_bytes,
    layer_param_numels,
    layers_param_numels,
    stage_activation_bytes,
)
from megadeep.pipeline.partition import stage_bounds, stage_param_numels, stage_params  # noqa: F401

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelStates:
    """Bytes of one rank's parameters, gradients and optimizer states."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def adam_bytes_per_param(precision: str, stage: int, offload_optimizer: str = "none") -> int:
    """K of the ZeRO paper for Adam: fp32 momentum and variance (8), plus 4 for the fp32 master copy
    that mixed precision needs. In fp32 training stage 0 goes without (Adam updates the parameters in
    place) and so does stage 3 with the optimizer on the device (the flat partition is the master,
    see megadeep.training.ds_fixes); DeepSpeed's stage 1/2 optimizers and an offloaded optimizer keep
    an fp32 copy of the partition apart from the parameters even when those are fp32 already."""
    shared = stage == 0 or (stage == 3 and offload_optimizer == "none")
    return 8 if precision == "fp32" and shared else 12


def model_states(n_params: float, stage: int, dp: int, precision: str, persistent: float = 0,
                 offload_optimizer: str = "none") -> ModelStates:
    """ZeRO's per-rank model states for ``n_params`` parameters held by this rank before ZeRO.
    At stage 3, ``persistent`` parameters (small tensors DeepSpeed keeps gathered) are held whole on
    top of the rank's share of the partitioned flat buffer, which still covers them."""
    p = DTYPE_BYTES[precision]
    return ModelStates(
        params=(n_params / dp + persistent) * p if stage >= 3 else n_params * p,
        grads=n_params * p / (dp if stage >= 2 else 1),
        optimizer=n_params * adam_bytes_per_param(precision, stage, offload_optimizer) / (dp if stage >= 1 else 1),
    )


def persistent_numel(numels: list[int], threshold: int) -> int:
    """Parameters ZeRO-3 keeps whole on every rank (``stage3_param_persistence_threshold``)."""
    return sum(n for n in numels if n <= threshold)




def rank_model_states(cfg, zero_stage: int, persistence_threshold: int, pp_rank: int = 0,
                      offload_optimizer: str = "none") -> ModelStates:
    """The model states one rank of run config ``cfg`` holds (its pipeline stage's parameters as
    megadeep.model.accounting counts them, ZeRO-partitioned at ``zero_stage``; the stage and the
    persistence threshold are the resolved run's, read from its recipe once)."""
    p = cfg.parallel
    numels = stage_param_numels(cfg.model, p.tp, p.pp, p.partition_method, p.ep)[pp_rank]
    bounds = stage_bounds(cfg.model, p.tp, p.pp, p.partition_method)  # pipeline layers; layer i is block i-1
    blocks = [i - 1 for i in range(bounds[pp_rank], bounds[pp_rank + 1]) if 1 <= i <= cfg.model.n_layers]
    experts = expert_param_numel(cfg.model, p.tp, p.ep, blocks)
    dense = model_states(sum(numels) - experts, zero_stage, p.dp * p.cp, cfg.train.precision,  # ZeRO shards over DP×CP
                         persistent=persistent_numel(numels, persistence_threshold), offload_optimizer=offload_optimizer)
    if not experts:
        return dense
    moe = model_states(experts, zero_stage, p.dp // p.ep * p.cp, cfg.train.precision, offload_optimizer=offload_optimizer)  # over the expert-DP group
    return ModelStates(dense.params + moe.params, dense.grads + moe.grads, dense.optimizer + moe.optimizer)
