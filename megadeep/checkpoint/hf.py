"""Hugging Face Llama ↔ megadeep checkpoints.

The mapping is one table. Our attention already uses HF's rotate-half RoPE layout, so q/k need no
permutation; the fused ``wqkv`` is ``[q; k; v]`` and ``w13`` is ``[gate; up]`` of the full tensors
(their TP blocks are handled by the checkpoint's sharding, not here); a tied head is
HF's ``tie_word_embeddings`` (no ``lm_head.weight`` stored). Export writes ``config.json`` in
transformers 5 form (``rope_parameters``, ``dtype``) and one ``model.safetensors``; import reads
only safetensors (a ``pytorch_model.bin`` is a pickle and is refused).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megadeep.checkpoint import mixtral
from megadeep.checkpoint.convert import canonical_specs, open_source, write_checkpoint
from megadeep.checkpoint.tensors import TensorReader
from megadeep.config.load import to_dict
from megadeep.config.schema import ModelConfig, RunConfig
from megadeep.errors import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Per-layer names: ours → HF (after ``layers.N.`` / ``model.layers.N.``).
LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
# Fused weights: ours → the HF weights stacked in it, in order.
FUSED = {
    "attention.wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "feed_forward.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
TOP_NAMES = {"tok_embeddings.embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.proj.weight": "lm_head.weight"}


def hf_config(m: ModelConfig, dtype: str) -> dict:
    if m.deepnorm:
        raise CheckpointError("a model.deepnorm=true model (post-norm with α-scaled residuals) is not a Llama; "
                              "it cannot be exported to LlamaForCausalLM")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.hidden_ffn,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": m.attention_dropout, "initializer_range": m.init_std, "dtype": dtype,
        "use_cache": True,
    }
    return mixtral.extend_config(config, m) if m.moe.enabled else config


def model_config_from_hf(c: dict) -> ModelConfig:
    if c.get("model_type") == "mixtral":
        return mixtral.model_config(c, model_config_from_hf)
    if c.get("model_type") != "llama":
        raise CheckpointError(f"config.json has model_type {c.get('model_type')!r}; only llama is supported")
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise CheckpointError("attention/MLP biases are not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {c.get('hidden_act')!r} is not supported (only silu)")
    heads = c["num_attention_heads"]
    if c.get("head_dim", c["hidden_size"] // heads) * heads != c["hidden_size"]:
        raise CheckpointError("head_dim × num_attention_heads must equal hidden_size")
    return ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads", heads), ffn_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048), norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", 10000.0)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=c.get("initializer_range", 0.02), attention_dropout=c.get("attention_dropout", 0.0),
        residual_scaling=False,
    )


def to_hf(name: str, t: torch.Tensor, blocks) -> dict[str, torch.Tensor]:
    """HF tensors of our canonical ``name``; ``blocks``: the sizes of a fused weight's parts."""
    if name in TOP_NAMES:
        return {TOP_NAMES[name]: t}
    _, layer, rest = name.split(".", 2)
    prefix = f"model.layers.{layer}."
    if rest in FUSED:
        return {prefix + k: part for k, part in zip(FUSED[rest], t.split(list(blocks)), strict=True)}
    return {prefix + (LAYER_NAMES.get(rest) or mixtral.LAYER_NAMES[rest]): t}


def from_hf(name: str, hf: dict[str, torch.Tensor], n_experts: int = 0) -> torch.Tensor:
    """Our canonical tensor ``name`` from an HF state dict (``n_experts``: a Mixtral's)."""
    if name in TOP_NAMES:
        return _need(hf, TOP_NAMES[name])
    _, layer, rest = name.split(".", 2)
    prefix = f"model.layers.{layer}."
    if rest in FUSED:
        return torch.cat([_need(hf, prefix + k) for k in FUSED[rest]])
    moe = mixtral.from_hf(prefix, rest, hf, n_experts, _need)
    return moe if moe is not None else _need(hf, prefix + LAYER_NAMES[rest])



def _need(hf: dict, key: str) -> torch.Tensor:
    if key not in hf:
        raise CheckpointError(f"the Hugging Face weights have no '{key}'")
    return hf[key]


def export_hf(src: Path, out: Path, dtype: str = "float32", tokenizer: str | None = None) -> Path:
    """Write a folder ``LlamaForCausalLM.from_pretrained`` loads, from a checkpoint of any layout."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = open_source(src)
    m = ckpt.model_config
    config = hf_config(m, dtype)
    reader = TensorReader(ckpt)
    tensors = {}
    for name in reader.specs:
        for key, t in to_hf(name, reader.full("model", name), reader.specs[name].blocks).items():
            tensors[key] = t.to(DTYPES[dtype]).contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = tokenizer or ckpt.meta["config"].get("data", {}).get("tokenizer") or ""
    if tok and Path(tok).is_file():  # a SentencePiece model: HF's LlamaTokenizer reads it
        shutil.copy(tok, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}) + "\n")
    return out


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder} holds only pickle weights (*.bin/*.pt), which can run code when loaded; "
                              "convert them to safetensors with a tool you trust first")
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    weights = {}
    for shard in shards:
        try:
            weights.update(load_file(folder / shard))
        except Exception as e:
            raise CheckpointError(f"{folder / shard}: not a readable safetensors file ({e})") from None
    return weights


def import_hf(folder: Path, dst_root: Path, tp: int = 1) -> Path:
    """Write a weights-only megadeep checkpoint (step 0) for TP=``tp`` from an HF Llama folder.
    Train from it with ``checkpoint.resume=<the step_00000000 dir>`` (fresh optimizer, step 0)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    m = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    if tp < 1 or m.n_heads % tp or m.kv_heads % tp or m.hidden_ffn % tp:
        raise CheckpointError(f"tp={tp} does not divide the heads ({m.n_heads}), kv-heads ({m.kv_heads}) "
                              f"and FFN width ({m.hidden_ffn})")
    hf = read_hf_weights(folder)
    cfg = RunConfig(model=m)
    cfg.parallel.tp = tp
    meta = {"step": 0, "consumed_samples": 0, "layout": {"tp": tp, "pp": 1, "dp": 1},
            "zero_stage": None, "precision": "fp32", "config": to_dict(cfg), "optimizer": None, "rng": False,
            "source": f"huggingface:{folder}"}
    specs = canonical_specs(m)
    return write_checkpoint(Path(dst_root), meta, specs, lambda kind, name: from_hf(name, hf, m.moe.num_experts).float(),
                            ("model",), tp, m.padded_vocab(tp))

