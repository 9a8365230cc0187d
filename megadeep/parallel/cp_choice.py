"""Which context-parallel attention a run uses, without importing torch (the planner reads it too)."""
from __future__ import annotations

METHODS = ("auto", "ulysses", "allgather")


def pick(method: str, kv_heads_per_tp: int, cp: int) -> str:
    """``parallel.cp_attention`` decided: Ulysses when it can split the KV heads of a TP rank over cp,
    else all-gather-KV (see megadeep.parallel.context)."""
    if method != "auto":
        return method
    return "ulysses" if kv_heads_per_tp % cp == 0 else "allgather"
