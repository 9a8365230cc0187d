"""A checkpoint of any layout as this process's TP shard of the model, ready for inference.

Process groups decide the shard (none: the whole model); the reader cuts each rank's piece from
whatever TP size the checkpoint was saved at, as a training run's resume does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megadeep.checkpoint.convert import open_source
from megadeep.checkpoint.store import Checkpoint
from megadeep.checkpoint.tensors import TensorReader
from megadeep.errors import CheckpointError
from megadeep.model.llama import Transformer
from megadeep.parallel import groups


def load_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Copy this rank's TP piece of every parameter of ``model`` from ``ckpt`` (names are canonical)."""
    reader = TensorReader(ckpt)
    tp, rank = groups.get_tensor_model_parallel_world_size(), groups.get_tensor_model_parallel_rank()
    padded = ckpt.model_config.padded_vocab(tp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in reader.specs:
                raise CheckpointError(f"{ckpt.path}: has no tensor '{name}'")
            p.copy_(reader.piece("model", name, rank, tp, padded))


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, Checkpoint]:
    """The checkpoint at ``path`` (a step dir or a run's checkpoint dir) as an fp32 model in eval mode
    with gradients off."""
    ckpt = open_source(Path(path))
    with torch.device("meta"):
        model = Transformer(ckpt.model_config)
    model.to_empty(device=torch.device(device))
    load_weights(model, ckpt)
    return model.requires_grad_(False).eval(), ckpt
