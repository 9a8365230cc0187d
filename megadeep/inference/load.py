"""A checkpoint of any layout as this process's TP shard of the model, ready for inference.

Process groups decide the shard (none: the whole model); the reader cuts each rank's piece from
whatever TP size the checkpoint was saved at, as a training run's resume does. A LoRA run's checkpoint
holds only its adapters: the model is its ``finetune.base`` with the adapters on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from megadeep.checkpoint.convert import open_source
from megadeep.checkpoint.store import Checkpoint
from megadeep.checkpoint.tensors import TensorReader
from megadeep.errors import CheckpointError
from megadeep.model.llama import Transformer, materialize
from megadeep.parallel import groups


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, which: Callable[[str], bool] = lambda name: True) -> None:
    """Copy this rank's TP piece of each parameter of ``model`` named by ``which`` from ``ckpt``."""
    reader = TensorReader(ckpt)
    tp, rank = groups.get_tensor_model_parallel_world_size(), groups.get_tensor_model_parallel_rank()
    padded = ckpt.model_config.padded_vocab(tp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not which(name):
                continue
            if name not in reader.specs:
                raise CheckpointError(f"{ckpt.path}: has no tensor '{name}'")
            p.copy_(reader.piece("model", name, rank, tp, padded))


def lora_base(ckpt: Checkpoint) -> Checkpoint | None:
    """The base checkpoint under a LoRA run's adapters (None for any other checkpoint)."""
    f = ckpt.meta["config"].get("finetune", {})
    if not f.get("lora", {}).get("rank"):
        return None
    if not f.get("base"):
        raise CheckpointError(f"{ckpt.path}: LoRA adapters trained on a freshly initialised base (no "
                              "finetune.base): there are no base weights to put them on")
    return open_source(Path(f["base"]))


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, Checkpoint]:
    """The checkpoint at ``path`` (a step dir or a run's checkpoint dir) as an fp32 model in eval mode
    with gradients off."""
    from megadeep.config.load import typed
    from megadeep.config.schema import LoraConfig
    from megadeep.finetune.lora import adapter_names, apply_lora

    ckpt = open_source(Path(path))
    with torch.device("meta"):
        model = Transformer(ckpt.model_config)
    materialize(model, {}, torch.device(device), 0)  # allocated, sharding marks kept; the weights are read next
    base = lora_base(ckpt)
    if base is None:
        load_weights(model, ckpt)
    else:
        load_weights(model, base)
        apply_lora(model, typed(LoraConfig, ckpt.meta["config"]["finetune"]["lora"], "finetune.lora"), 0)
        load_weights(model, ckpt, lambda name: adapter_names(name) is not None)
    return model.requires_grad_(False).eval(), ckpt
