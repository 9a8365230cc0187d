"""What one rank really holds for training: bytes of parameters, gradients and optimizer states.

Walks the model and DeepSpeed's optimizer objects and counts every tensor *storage* once, so views
into DeepSpeed's flat buffers (ZeRO's flattened bit16 groups, fp32 master partitions, contiguous
gradient partitions, offloaded CPU copies) are neither missed nor double counted. Whatever the
optimizer wrapper holds that is not a parameter, gradient store or optimizer state is reported as
``buffers`` (communication buckets, offload staging buffers): the ZeRO paper's "residual states".
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

CATEGORIES = ("params", "grads", "optimizer", "buffers")

# Attributes of DeepSpeed's optimizer wrappers (0.19) that hold (views of) gradients waiting for the
# optimizer step, and fp32 master weights. Everything else they hold that is not a parameter is a
# buffer. Name-mangled private attributes carry their class prefix.
GRAD_STORES = (
    "averaged_gradients",  # stage 1/2: per-group gradient partitions (views of one of the next)
    "grads_in_partition",  # stage 2: gradients of the parameters overlapping this rank's partition
    "all_grad_tensors",  # stage 1/2: the same, per parameter, while micro-batches accumulate
    "accumulated_grads_in_cpu",  # stage 1/2 with CPU offload and accumulation
    "grad_partitions_flat_buffer",  # stage 3: the contiguous gradient partition
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",  # stage 3: views of the above
    "fp32_groups_gradients_flat",  # bf16 optimizer at stage 0/1: fp32 gradient accumulators
    "fp32_groups_gradient_dict",
)
MASTER_WEIGHTS = (
    "single_partition_of_fp32_groups",  # stage 1/2
    "fp32_partitioned_groups_flat",  # stage 3 (the parameter partition itself in fp32 training)
    "fp32_groups_flat",  # fp16/bf16 optimizers at stage 0
    "fp32_groups_flat_partition",  # bf16 optimizer
)


@dataclass
class StateBytes:
    """Bytes per category and device type ('cpu', 'cuda', ...) held by one rank."""

    by_device: dict = field(default_factory=lambda: defaultdict(int))  # (category, device type) -> bytes

    def total(self, category: str) -> int:
        return sum(n for (c, _), n in self.by_device.items() if c == category)

    def as_dict(self) -> dict:
        out = {c: self.total(c) for c in CATEGORIES}
        out["by_device"] = {f"{c}@{d}": n for (c, d), n in sorted(self.by_device.items())}
        return out


class _Counter:
    def __init__(self):
        self.seen: set = set()
        self.bytes = StateBytes()

    def add(self, category: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.bytes.by_device[(category, tensor.device.type)] += storage.nbytes()


def _reachable_tensors(obj, depth: int, visited: set):
    """Tensors inside ``obj`` through containers and DeepSpeed / torch.optim objects (not modules)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth == 0 or id(obj) in visited or isinstance(obj, (nn.Module, str, bytes, int, float, bool)):
        return
    visited.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif type(obj).__module__.startswith(("deepspeed.", "torch.optim")) and hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        yield from _reachable_tensors(item, depth - 1, visited)


def measure(model: nn.Module, optimizer, basic_optimizer) -> StateBytes:
    """Bytes held by ``model`` and DeepSpeed's ``optimizer`` (the engine's wrapper, whose inner
    ``basic_optimizer`` owns the Adam moments), each storage counted once, in priority order:
    parameters, then optimizer states (moments and fp32 master weights), then gradients, then the rest.
    """
    count = _Counter()
    wrapper = vars(optimizer) if optimizer is not basic_optimizer else {}

    def add_attrs(names, category):
        for name in names:
            for t in _reachable_tensors(wrapper.get(name), 6, {id(basic_optimizer)}):
                count.add(category, t)

    params = list(model.parameters())
    for p in params:
        count.add("params", p.data)
        count.add("params", getattr(p, "ds_tensor", None))  # ZeRO-3: this rank's partition
    for state in basic_optimizer.state.values():
        for t in _reachable_tensors(state, 3, set()):
            count.add("optimizer", t)
    masters = [p for group in basic_optimizer.param_groups for p in group["params"]]
    for p in masters:
        count.add("optimizer", p.data)  # fp32 master weights (when they are not the model's own)
    add_attrs(MASTER_WEIGHTS, "optimizer")
    for p in params + masters:
        count.add("grads", p.grad)
    add_attrs(GRAD_STORES, "grads")
    add_attrs(wrapper, "buffers")
    return count.bytes


def measure_engine(engine) -> StateBytes:
    return measure(engine.module, engine.optimizer, engine.basic_optimizer)
