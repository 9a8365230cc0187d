"""Expert-parallel communication: token dispatch and combine as an all-to-all autograd function over
the EP group, and handing our expert groups to DeepSpeed.

Why our own all-to-all and not DeepSpeed's (``deepspeed.moe.sharded_moe._AllToAll``): that one sends
equal splits, i.e. every expert padded to a capacity; dropless routing sends each rank exactly the
tokens routed to its experts, so the splits vary per step (``all_to_all_single`` with split sizes).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megadeep.parallel import groups


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert groups of EP size ``ep`` (what expert params carry as ``group_name``)."""
    return f"ep_size_{ep}"


def mark_expert(param: torch.nn.Parameter, ep: int) -> torch.nn.Parameter:
    """Tag ``param`` as an expert parameter, the way DeepSpeed's MoE layer does (its engine and ZeRO
    read ``allreduce`` and ``group_name``); ``expert_parallel`` tells megadeep's own code."""
    param.allreduce = False
    param.group_name = expert_group_name(ep)
    param.expert_parallel = True
    return param


def is_expert(param: torch.Tensor) -> bool:
    return getattr(param, "expert_parallel", False)


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    me = groups.get_expert_parallel_rank()
    row = math.prod(x.shape[1:]) * x.element_size()
    groups.count_a2a_bytes(row * (sum(send) - send[me]))  # what leaves this rank
    dist.all_to_all_single(out, x, recv, send, group=groups.get_expert_parallel_group())
    return out


class _AllToAll(torch.autograd.Function):
    """Rows ``send[i]`` go to EP rank i; the gradient travels back the same way (splits swapped)."""

    @staticmethod
    def forward(ctx, x, send, recv):
        ctx.splits = (send, recv)
        return _all_to_all(x, send, recv)

    @staticmethod
    def backward(ctx, g):
        send, recv = ctx.splits
        return _all_to_all(g, recv, send), None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv)


def exchange_counts(counts: torch.Tensor) -> torch.Tensor:
    """``counts[r, j]``: rows this rank sends for expert j of EP rank r → ``out[s, j]``: rows EP rank s
    sends for this rank's expert j."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=groups.get_expert_parallel_group())
    return out


def register_with_deepspeed() -> None:
    """Make DeepSpeed's expert groups (``deepspeed.utils.groups``) ours, so its engine and ZeRO reduce
    expert gradients over exactly the expert-data-parallel ranks of ``Layout.expert_dp_groups``
    (DeepSpeed would otherwise build its own from its rank formula). Called after
    ``groups.initialize``, before ``deepspeed.initialize``; a later layout in the process replaces them."""
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups.get_expert_parallel_world_size())
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.get_expert_parallel_group()
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = groups.get_expert_parallel_group_ranks()
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.get_expert_data_parallel_group()
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = groups.get_expert_data_parallel_group_ranks()


def deepspeed_moe_marker(num_experts: int) -> torch.nn.Module:
    """A parameterless ``deepspeed.moe.layer.MoE`` for the model to carry. DeepSpeed's engine turns on
    its expert handling (expert gradients reduced over the expert-data-parallel group, ZeRO's MoE
    parameter groups) only when it finds an instance of that class among the modules; our MoE layer is
    not one (see ``megadeep.model.moe`` for why), so this stands in for it. Its forward is never called."""
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)  # none of MoE's own experts or gate
            self.num_experts = num_experts

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The groups are already ours (``register_with_deepspeed``)."""

        def forward(self, *args, **kwargs):
            raise RuntimeError("the DeepSpeed MoE marker is not a layer")

    return DeepSpeedMoEMarker()


def gather_experts(local: torch.Tensor) -> torch.Tensor:
    """All ``E`` experts' tensor ``[E, ...]`` from every EP rank's ``[E/EP, ...]`` (collective over EP)."""
    ep = groups.get_expert_parallel_world_size()
    if ep == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ep)]
    dist.all_gather(parts, local.contiguous(), group=groups.get_expert_parallel_group())
    return torch.cat(parts)


def local_experts(full: torch.Tensor) -> torch.Tensor:
    """This EP rank's consecutive experts of a full ``[E, ...]`` tensor."""
    n = full.shape[0] // groups.get_expert_parallel_world_size()
    return full.narrow(0, groups.get_expert_parallel_rank() * n, n)
