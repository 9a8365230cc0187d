"""Which layers each pipeline stage holds, decided by megadeep before any rank starts.

The stages are cut over the layer list ``[embedding, block 0 … block L-1, final norm, head]``, and
every stage holds at least one decoder block: a stage of only the embedding or only the head has no
1-D parameters, hence one optimizer param group fewer than the others (DeepSpeed drops empty groups),
and ZeRO's per-group grad-norm all-reduce across stages then deadlocks. DeepSpeed's own partitioners
(``partition_balanced``/``partition_uniform``) know no such constraint (its ``parameters`` gives a
4-stage tiny model a stage of only the embedding), and they live behind an import of DeepSpeed and
torch (seconds), too slow for the launcher's checks. So megadeep cuts the stages here, in plain
Python, and ``PipelinedLlama`` hands these bounds to DeepSpeed's pipeline engine.

Methods: ``parameters`` balances the parameter count of the stages, ``uniform`` the number of
blocks, ``type:<regex>`` the number of layers whose class name matches (as DeepSpeed's ``type:``).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from megadeep.errors import ConfigError

if TYPE_CHECKING:  # config validation imports this module: no import of megadeep.config at run time
    from megadeep.config.schema import ModelConfig

METHODS = ("parameters", "uniform", "type:<regex>")


def layer_names(m: ModelConfig) -> list[str]:
    """Canonical name of each pipeline layer, in forward order (the tied head shares the embedding's)."""
    return ["tok_embeddings", *(f"layers.{i}" for i in range(m.n_layers)), "norm", "output"]


def layer_types(m: ModelConfig) -> list[str]:
    """Class name of each pipeline layer (what ``type:<regex>`` matches, as in DeepSpeed)."""
    return ["TokenEmbedding", *["Block"] * m.n_layers, "RMSNorm", "TokenEmbedding" if m.tie_embeddings else "OutputHead"]


def _type_regex(method: str) -> re.Pattern:
    try:
        return re.compile(method[len("type:"):], re.IGNORECASE)
    except re.error as e:
        raise ConfigError(f"parallel.partition_method='{method}' is not a valid regex ({e})") from None


def check_method(m: ModelConfig, method: str) -> None:
    """Refuse a method that names nothing to balance (before any process starts)."""
    if method in ("parameters", "uniform"):
        return
    if not method.startswith("type:"):
        raise ConfigError(f"parallel.partition_method must be one of {', '.join(METHODS)}, got '{method}'")
    rx = _type_regex(method)
    if not any(rx.search(t) for t in layer_types(m)):
        raise ConfigError(f"parallel.partition_method='{method}' matches no layer type "
                          f"({', '.join(sorted(set(layer_types(m))))}); e.g. type:Block")


def _weights(m: ModelConfig, tp: int, method: str) -> list[int]:
    if method == "uniform":
        return [int(t == "Block") for t in layer_types(m)]
    if method.startswith("type:"):
        rx = _type_regex(method)
        return [int(bool(rx.search(t))) for t in layer_types(m)]
    from megadeep.model.accounting import spec_param_numels  # the one count of each layer's parameters

    return spec_param_numels(m, tp)


def stage_bounds(m: ModelConfig, tp: int, pp: int, method: str) -> list[int]:
    """``pp + 1`` layer indices: stage ``s`` holds layers ``[b[s], b[s+1])`` of :func:`layer_names`.
    Minimises the heaviest stage under the constraint that each stage holds ≥ 1 block (exact DP)."""
    check_method(m, method)
    if not 1 <= pp <= m.n_layers:
        raise ConfigError(f"parallel.pp={pp} needs between 1 and model.n_layers={m.n_layers} stages")
    weights, blocks = _weights(m, tp, method), [int(t == "Block") for t in layer_types(m)]
    n = len(weights)
    load, nblocks = [0], [0]
    for w, b in zip(weights, blocks):
        load.append(load[-1] + w)
        nblocks.append(nblocks[-1] + b)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp + 1)]  # best[s][i]: layers[:i] on s stages, heaviest stage
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0
    for s in range(1, pp + 1):
        for i in range(1, n + 1):
            for j in range(i):  # stage s-1 holds layers[j:i]
                if best[s - 1][j] < inf and nblocks[i] > nblocks[j]:
                    cost = max(best[s - 1][j], load[i] - load[j])
                    if cost < best[s][i]:
                        best[s][i], cut[s][i] = cost, j
    bounds = [n]
    for s in range(pp, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def stage_layers(m: ModelConfig, tp: int, pp: int, method: str = "parameters") -> list[int]:
    """Decoder blocks on each pipeline stage."""
    parts = stage_bounds(m, tp, pp, method)
    return [sum(1 for i in range(parts[s], parts[s + 1]) if 1 <= i <= m.n_layers) for s in range(pp)]


def stage_param_numels(m: ModelConfig, tp: int, pp: int, method: str = "parameters", ep: int = 1) -> list[list[int]]:
    """Parameter tensor sizes held by one TP (and EP) rank of each pipeline stage. With tied embeddings
    and pp > 1 the last stage holds its own copy of the embedding (TiedLayerSpec)."""
    from megadeep.model.accounting import embedding_numel, layers_param_numels

    embedding = embedding_numel(m, tp)
    layers = layers_param_numels(m, tp, ep)
    if pp == 1:
        return [[embedding, *(n for layer in layers for n in layer), m.dim]
                + ([] if m.tie_embeddings else [embedding])]
    parts = stage_bounds(m, tp, pp, method)
    spec_tensors = [[embedding], *layers, [m.dim], [embedding]]
    return [[n for i in range(parts[s], parts[s + 1]) for n in spec_tensors[i]] for s in range(pp)]


def stage_params(m: ModelConfig, tp: int, pp: int, method: str = "parameters", ep: int = 1) -> list[int]:
    """Parameters per rank of each pipeline stage (the canonical per-rank count)."""
    return [sum(s) for s in stage_param_numels(m, tp, pp, method, ep)]


def describe(names: list[str]) -> str:
    """``tok_embeddings, layers.0, layers.1, layers.2`` → ``tok_embeddings, layers.0-2``."""
    out: list[str] = []
    for name in names:
        if name.startswith("layers.") and out and out[-1].startswith("layers."):
            out[-1] = f"{out[-1].split('-')[0]}-{name.split('.')[1]}"
        else:
            out.append(name)
    return ", ".join(out) or "(nothing)"
