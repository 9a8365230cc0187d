"""This rank's model for a fine-tuning run: the (TP-sharded) model, its weights from ``finetune.base``,
then LoRA adapters with the base frozen.

Unlike pre-training (``training.build``) the model is not built inside ``deepspeed.zero.Init``: the base
weights are loaded into each rank's whole TP shard first, and DeepSpeed's engine partitions the module
over DP under ZeRO-3 when it starts (``deepspeed.initialize`` converts parameters zero.Init did not).
"""
from __future__ import annotations

import torch
from torch import nn

from megadeep.config.schema import RunConfig
from megadeep.model.llama import Transformer, materialize


def finetuning(cfg: RunConfig) -> bool:
    return bool(cfg.finetune.base or cfg.finetune.lora.rank)


def build_finetune_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    from megadeep.checkpoint.convert import open_source
    from megadeep.checkpoint.manager import check_architecture
    from megadeep.finetune.lora import apply_lora
    from megadeep.inference.load import load_weights

    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.parallel.sequence_parallel)
    materialize(model, {"": model}, device, cfg.train.seed)
    if cfg.finetune.base:
        base = open_source(cfg.finetune.base)
        check_architecture(base.model_config, cfg.model, base.path)
        load_weights(model, base)
    if cfg.finetune.lora.rank:
        apply_lora(model, cfg.finetune.lora, cfg.train.seed)
    return model
