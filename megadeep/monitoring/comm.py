"""Bytes moved per step, by parallel axis and collective type.

TP traffic is counted by megadeep's own communication layer, exactly (``groups.take_tp_bytes``).
DP and PP traffic is the DeepSpeed engine's (ZeRO/gradient reduction, pipeline p2p), counted by
DeepSpeed's comms logger, which the run enables with ``log.comm_stats=true``. The logger names ops, not
groups, so its point-to-point ops (send/recv, and the broadcasts DeepSpeed's pipeline uses in their place)
are attributed to PP and its collectives to DP. All numbers are payload bytes as each layer reports them:
for TP the full tensor a collective reduces or gathers.
"""
from __future__ import annotations

from collections import Counter

from megadeep.parallel import groups

P2P_OPS = ("send", "recv", "isend", "irecv", "broadcast", "batch_isend_irecv")


def _deepspeed_totals() -> Counter:
    from deepspeed.comm import comms_logger

    totals = Counter()
    for name, sizes in comms_logger.comms_dict.items():
        totals[name] += sum(size * entry[0] for size, entry in sizes.items())
    return totals


class CommMeter:
    def __init__(self):
        self.seen = _deepspeed_totals()
        groups.take_tp_bytes()

    def step(self) -> dict[str, dict[str, int]]:
        """Bytes per axis and op since the previous call."""
        now = _deepspeed_totals()
        engine = {op: n - self.seen.get(op, 0) for op, n in now.items() if n != self.seen.get(op, 0)}
        self.seen = now
        return {
            "tp": groups.take_tp_bytes(),
            "dp": {op: n for op, n in engine.items() if not op.startswith(P2P_OPS)},
            "pp": {op: n for op, n in engine.items() if op.startswith(P2P_OPS)},
        }


def min_tp_bytes_per_layer(batch: int, seq: int, dim: int, element_size: int, sequence_parallel: bool) -> dict:
    """The least TP payload one decoder layer needs per forward+backward (Megatron's scheme).

    Without SP: four all-reduces of the [batch, seq, dim] activations (after attention and MLP
    forward; on their inputs backward). With SP each becomes an all-gather + reduce-scatter pair
    (same wire bytes per rank in a ring), plus the all-reduce of the two norm weights' gradients.
    """
    act = batch * seq * dim * element_size
    if not sequence_parallel:
        return {"all_reduce": 4 * act}
    return {"all_gather": 4 * act, "reduce_scatter": 4 * act, "all_reduce": 2 * dim * element_size}
