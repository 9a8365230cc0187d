"""Hugging Face Mixtral ↔ megadeep MoE checkpoints: what ``hf.py`` adds for a model with ``model.moe``.

transformers 5 stores Mixtral's experts batched exactly as ours (``mlp.experts.gate_up_proj`` is
``[E, 2·ffn, dim]`` stacked ``[gate; up]``, ``mlp.experts.down_proj`` is ``[E, dim, ffn]``) and its router
as ``mlp.gate.weight``, so the mapping is by name only. Older Mixtral folders store each expert's
``block_sparse_moe.experts.N.{w1,w3,w2}`` separately; import stacks those.
"""
from __future__ import annotations

import dataclasses

import torch

from megadeep.config.schema import ModelConfig, MoEConfig
from megadeep.errors import CheckpointError

# Per-layer names: ours → HF (after ``layers.N.`` / ``model.layers.N.``).
LAYER_NAMES = {
    "feed_forward.router.weight": "mlp.gate.weight",
    "feed_forward.experts.w13": "mlp.experts.gate_up_proj",
    "feed_forward.experts.w2": "mlp.experts.down_proj",
}
# The per-expert form of older folders: ours → the HF tensors stacked in it ("{}": each expert)
LEGACY = {
    "feed_forward.router.weight": ("block_sparse_moe.gate.weight",),
    "feed_forward.experts.w13": ("block_sparse_moe.experts.{}.w1.weight", "block_sparse_moe.experts.{}.w3.weight"),
    "feed_forward.experts.w2": ("block_sparse_moe.experts.{}.w2.weight",),
}


def extend_config(config: dict, m: ModelConfig) -> dict:
    """Turn ``hf.hf_config``'s Llama config into a ``MixtralConfig`` for the MoE model ``m``."""
    moe = m.moe
    if moe.every != 1 or moe.shared_experts or moe.capacity_factor:
        raise CheckpointError("MixtralForCausalLM has dropless routed experts in every layer and no shared experts; "
                              f"this model has model.moe.every={moe.every}, shared_experts={moe.shared_experts}, "
                              f"capacity_factor={moe.capacity_factor}: it cannot be exported as Mixtral")
    config = {k: v for k, v in config.items() if k not in ("mlp_bias", "attention_bias")}
    return {**config, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "intermediate_size": m.expert_ffn, "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None}


# Mixtral's config.json keys beyond Llama's: read here (or refused above), not by the Llama reader.
MIXTRAL_KEYS = {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits",
                "router_jitter_noise", "sliding_window"}


def model_config(c: dict, llama_config) -> ModelConfig:
    """Our MoE model config from a Mixtral ``config.json`` (``llama_config`` reads the shared part)."""
    if c.get("sliding_window"):
        raise CheckpointError(f"sliding_window={c['sliding_window']} is not supported (full causal attention only)")
    if c.get("router_jitter_noise"):
        raise CheckpointError("router_jitter_noise is not supported")
    m = llama_config({k: v for k, v in c.items() if k not in MIXTRAL_KEYS} | {"model_type": "llama"})
    return dataclasses.replace(m, moe=MoEConfig(num_experts=c["num_local_experts"], top_k=c["num_experts_per_tok"],
                                                aux_loss_coef=float(c.get("router_aux_loss_coef", 0.01))))


def from_hf(prefix: str, rest: str, hf: dict[str, torch.Tensor], n_experts: int, need) -> torch.Tensor | None:
    """Our tensor ``rest`` of the layer at ``prefix`` from either Mixtral form (None: not an MoE name);
    ``need(hf, key)`` reads a tensor that must be there."""
    if rest not in LAYER_NAMES:
        return None
    if prefix + LAYER_NAMES[rest] in hf:
        return hf[prefix + LAYER_NAMES[rest]]
    parts = [prefix + p for p in LEGACY[rest]]
    if "{}" not in parts[0]:
        return need(hf, parts[0])
    return torch.stack([torch.cat([need(hf, p.format(e)) for p in parts]) for e in range(n_experts)])


def legacy_names(prefix: str, rest: str, n_experts: int) -> tuple[str, ...]:
    """The per-expert HF tensors of older folders that make our ``rest`` (none for a non-MoE name)."""
    return tuple(prefix + p.format(e) for p in LEGACY.get(rest, ())
                 for e in (range(n_experts) if "{}" in p else (0,)))
