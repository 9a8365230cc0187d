"""A LoRA run's adapters for the world outside: PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``, loaded by ``peft`` onto the exported base), or merged into the base
(``W + (α/r)·B A``) as a plain checkpoint that ``ckpt export-hf`` exports.

Names go through ``checkpoint.hf.to_hf``: a fused layer's ``B`` is cut into the Hugging Face projections
it stacks, each with the layer's one ``A`` (the same function as our fused adapter).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from megadeep.checkpoint.convert import canonical_specs, open_source, write_checkpoint
from megadeep.checkpoint.hf import to_hf
from megadeep.checkpoint.store import Checkpoint
from megadeep.checkpoint.tensors import TensorReader
from megadeep.errors import CheckpointError
from megadeep.finetune.lora import adapter_names
from megadeep.inference.load import lora_base


def _adapters(ckpt: Checkpoint) -> tuple[dict[str, dict[str, torch.Tensor]], dict, TensorReader]:
    """Base weight name → {"A": full A, "B": full B}; the LoRA settings; the reader."""
    lora = ckpt.meta["config"].get("finetune", {}).get("lora", {})
    if not lora.get("rank"):
        raise CheckpointError(f"{ckpt.path}: not a LoRA run's checkpoint (finetune.lora.rank is 0)")
    reader = TensorReader(ckpt)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in reader.specs:
        weight, which = adapter_names(name) or (None, None)
        if weight is None:
            raise CheckpointError(f"{ckpt.path}: '{name}' is not an adapter parameter")
        out.setdefault(weight, {})[which] = reader.full("model", name)
    return out, lora, reader


def export_peft(src: Path, out: Path, base_model: str = "") -> Path:
    """Write ``out/adapter_config.json`` and ``out/adapter_model.safetensors`` for ``peft``."""
    from safetensors.torch import save_file

    ckpt = open_source(Path(src))
    adapters, lora, reader = _adapters(ckpt)
    tensors, modules = {}, set()
    for weight, ab in adapters.items():
        blocks = reader.specs[weight.replace(".weight", ".lora.B")].blocks
        for key, b in to_hf(weight, ab["B"], blocks).items():
            module = key.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = ab["A"].clone().contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.clone().contiguous()
            modules.add(module.rsplit(".", 1)[1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
              "lora_dropout": lora["dropout"], "target_modules": sorted(modules), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": base_model or None}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def merge_lora(src: Path, dst_root: Path) -> Path:
    """Write ``dst_root/step_N``: the base with each adapter folded in, a TP=1 weights-only checkpoint."""
    ckpt = open_source(Path(src))
    adapters, lora, _ = _adapters(ckpt)
    base = lora_base(ckpt)
    base_reader = TensorReader(base)
    scale = lora["alpha"] / lora["rank"]

    def full(kind: str, name: str) -> torch.Tensor:
        w = base_reader.full("model", name)
        if name in adapters:
            w = w + scale * adapters[name]["B"] @ adapters[name]["A"]
        return w

    config = copy.deepcopy(ckpt.meta["config"])
    config["finetune"] = {**config["finetune"], "base": "", "lora": {**config["finetune"]["lora"], "rank": 0}}
    config["parallel"].update(tp=1, pp=1)
    meta = {"step": ckpt.step, "consumed_samples": ckpt.meta["consumed_samples"],
            "layout": {"tp": 1, "pp": 1, "dp": 1}, "zero_stage": None, "precision": "fp32", "config": config,
            "optimizer": None, "rng": False, "source": f"lora-merge:{ckpt.path} onto {base.path}"}
    m = base.model_config
    return write_checkpoint(Path(dst_root), meta, canonical_specs(m), full, ("model",), 1, m.padded_vocab(1))
