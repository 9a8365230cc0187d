"""Offline conversions between layouts (no processes, no DeepSpeed): rewrite a checkpoint's tensor
files for another TP size, and write checkpoints from full canonical tensors (used by HF import).

Only TP and PP decide how files are cut: DP size and ZeRO stage never change a file, so a checkpoint
loads into any DP/ZeRO as is (and into any TP/PP too, by resharding on load; converting offline just
lets every rank of the new layout read its own file only).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

import torch

from megadeep.checkpoint import store
from megadeep.checkpoint.tensors import KINDS, ParamSpec, TensorReader, piece_from_full, tensor_file
from megadeep.config.schema import ModelConfig
from megadeep.errors import CheckpointError

log = logging.getLogger("megadeep.checkpoint")


def canonical_specs(model_cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Specs of every canonical parameter, read off the model itself (built on the meta device)."""
    from megadeep.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    return {n: ParamSpec.of(n, p, 1, 0, model_cfg.vocab_size) for n, p in model.named_parameters()}


def write_checkpoint(root: Path, meta: dict, specs: dict[str, ParamSpec], full: Callable[[str, str], torch.Tensor],
                     kinds: tuple[str, ...], tp: int, padded_vocab: int) -> Path:
    """Write ``root/step_N`` for a TP=``tp``, PP=1 layout from ``full(kind, name)`` (full unpadded tensors)."""
    step = int(meta["step"])
    tmp = store.begin(root, step)
    files = {}
    for kind in kinds:
        tensors = {name: full(kind, name) for name in specs}
        for name, t in tensors.items():
            if list(t.shape) != specs[name].shape:
                raise CheckpointError(f"tensor '{name}' has shape {list(t.shape)}, expected {specs[name].shape}")
        for r in range(tp):
            rel = tensor_file(kind, r, 0)
            pieces = {n: piece_from_full(t, specs[n], r, tp, padded_vocab) for n, t in tensors.items()}
            files[rel] = store.write_tensors(tmp, rel, pieces, {"kind": kind})
    meta = dict(meta, params={n: dict(s.to_json(), stage=0) for n, s in specs.items()})
    files[store.META] = store.write_json(tmp, store.META, meta)
    return store.commit(tmp, files, step)


def open_verified(path: Path) -> store.Checkpoint:
    """Open a checkpoint and check every file it lists (offline tools read all of them), and that it
    holds every tensor its meta.json describes: a checkpoint of no tensors is not a checkpoint."""
    ckpt = store.Checkpoint.open(path)
    ckpt.verify(sorted(ckpt.files))
    _ = ckpt.model_config  # typed on access: a malformed model section fails here, not later
    reader = TensorReader(ckpt)
    if not reader.specs:
        raise CheckpointError(f"{path}: holds no parameters (meta.json lists none)")
    keys: dict[str, set] = {}
    for name, spec in reader.specs.items():
        for rel in (tensor_file("model", r, spec.stage) for r in range(reader.tp)):
            if rel not in keys:
                keys[rel] = set(ckpt.tensor_keys(rel)) if ckpt.has(rel) else set()
            if name not in keys[rel]:
                raise CheckpointError(f"{path}: has no tensor '{name}' in {rel}")
    return ckpt


def open_source(path: Path) -> store.Checkpoint:
    """The checkpoint ``path`` names, verified: a ``step_XXXXXXXX`` directory (exactly that one), or a
    run's checkpoint dir, whose ``latest`` is used, else (missing, dangling or damaged) the newest
    usable checkpoint there, with a warning."""
    path = Path(path)
    if store.is_checkpoint(path):
        return open_verified(path)
    found = store.candidates(path)
    pointed = store.latest(path)
    if pointed is not None:
        found = [pointed, *[p for p in found if p != pointed]]
    problems = []
    for candidate in found:
        try:
            ckpt = open_verified(candidate)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning(f"megadeep: warning: checkpoint {candidate} is unusable: {e}")
            continue
        if candidate != pointed:
            log.warning(f"megadeep: warning: {path / store.LATEST} is missing, unreadable or names no usable "
                        f"checkpoint; using the newest usable one, {candidate}")
        return ckpt
    if problems:
        raise CheckpointError(f"{path}: no usable checkpoint ({len(problems)} tried, newest: {problems[0]})")
    raise CheckpointError(f"{path}: neither a checkpoint (no manifest.json) nor a checkpoint dir holding one")


def reshard(src: Path, dst_root: Path, tp: int, pp: int = 1) -> Path:
    """Rewrite checkpoint ``src`` for TP=``tp`` into ``dst_root/step_N`` (moments and data position kept)."""
    if pp != 1:
        raise CheckpointError("offline resharding to pp>1 needs the pipeline stage map; load the PP=1 checkpoint "
                              "into the pipeline run instead (it reshards on load)")
    ckpt = open_source(src)
    reader = TensorReader(ckpt)
    model_cfg = ckpt.model_config
    if tp < 1 or model_cfg.n_heads % tp or model_cfg.kv_heads % tp or model_cfg.hidden_ffn % tp:
        raise CheckpointError(f"tp={tp} does not divide the model's heads ({model_cfg.n_heads}), kv-heads "
                              f"({model_cfg.kv_heads}) and FFN width ({model_cfg.hidden_ffn})")
    meta = copy.deepcopy(ckpt.meta)
    meta["layout"] = dict(meta["layout"], tp=tp, pp=pp)
    meta["config"]["parallel"].update(tp=tp, pp=pp)
    meta["rng"] = False  # per-rank streams belong to the old layout
    kinds = KINDS if meta.get("optimizer") is not None else KINDS[:1]
    return write_checkpoint(Path(dst_root), meta, reader.specs, reader.full, kinds, tp, model_cfg.padded_vocab(tp))
