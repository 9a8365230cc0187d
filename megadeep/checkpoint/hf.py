"""Hugging Face Llama / Mistral / Qwen2 ↔ megadeep checkpoints.

Each family is one entry of ``FAMILIES`` (its architecture, whether q/k/v have biases, and the
config.json keys of its own with the values megadeep can compute exactly); RoPE variants are read from
and written to both config.json layouts (``rope_from_hf``/``rope_to_hf``). A key outside these tables is
refused, naming it: an import is exact or it does not happen.

The tensor mapping is one table. Our attention already uses HF's rotate-half RoPE layout, so q/k need
no permutation; the fused ``wqkv`` is ``[q; k; v]`` and ``w13`` is ``[gate; up]`` of the full tensors
(their TP blocks are handled by the checkpoint's sharding, not here); a tied head is
HF's ``tie_word_embeddings`` (no ``lm_head.weight`` stored). Export writes ``config.json`` for the
family and RoPE layout the model came from (``model.family``, ``model.hf_rope_layout``) and one
``model.safetensors``; import reads only safetensors (a ``pytorch_model.bin`` is a pickle and is refused).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megadeep.checkpoint import mixtral
from megadeep.checkpoint.convert import canonical_specs, open_source, write_checkpoint
from megadeep.checkpoint.tensors import TensorReader
from megadeep.config.load import to_dict, typed
from megadeep.config.schema import HF_FAMILIES, ROPE_TYPES, ModelConfig, RopeScaling, RunConfig
from megadeep.errors import CheckpointError, ConfigError, DataError

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
    "attention.wqkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),  # qwen2
}
TOP_NAMES = {"tok_embeddings.embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.proj.weight": "lm_head.weight"}


# --- config.json ↔ ModelConfig, per family ---------------------------------------------------------
# Keys every family shares that megadeep models (read into ModelConfig, written back on export).
MODELLED = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_dropout",
            "initializer_range"}
# Keys that do not change what the model computes (bookkeeping, generation defaults, token ids).
INERT = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
         "eos_token_id", "pad_token_id", "use_cache", "_name_or_path", "pretraining_tp"}


def _no_bias(c: dict, v) -> str | None:
    return f"{v} (megadeep's Llama and Mistral layers have no such biases)" if v else None


def _window(c: dict, v) -> str | None:
    if v is None or v >= c.get("max_position_embeddings", 0):
        return None
    return (f"{v} is shorter than max_position_embeddings={c.get('max_position_embeddings')}: megadeep's "
            "attention has no sliding window, so it would attend further back than this model was trained to")


def _qwen_window(c: dict, v) -> str | None:
    return _window(c, c.get("sliding_window")) if v else None


def _full_attention(c: dict, v) -> str | None:
    return None if all(t == "full_attention" for t in v or ()) else f"{v} (only full_attention layers are modelled)"


# Each family's own keys: the value each must have for megadeep's model to compute what transformers
# does (a callable: a check returning the problem or None). Anything else in a config.json is refused.
FAMILIES = {
    "llama": {"architecture": "LlamaForCausalLM", "qkv_bias": False,
              "keys": {"attention_bias": _no_bias, "mlp_bias": _no_bias}},
    "mistral": {"architecture": "MistralForCausalLM", "qkv_bias": False,
                "keys": {"sliding_window": _window}},
    "qwen2": {"architecture": "Qwen2ForCausalLM", "qkv_bias": True,
              "keys": {"sliding_window": lambda c, v: None, "use_sliding_window": _qwen_window,
                       "max_window_layers": lambda c, v: None, "layer_types": _full_attention,
                       "use_mrope": lambda c, v: "multimodal RoPE is not modelled" if v else None}},
}
assert set(FAMILIES) == set(HF_FAMILIES)
# RoPE parameters each rope_type has (besides rope_type/type and rope_theta), as RopeScaling fields.
ROPE_KEYS = {
    "default": (), "linear": ("factor",), "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"),
}
assert set(ROPE_KEYS) == set(ROPE_TYPES)


def _refuse(key: str, why: str) -> ConfigError:
    return ConfigError(f"config.json: {key}: {why}; megadeep cannot import this model exactly, so it refuses it")


def rope_from_hf(c: dict) -> tuple[float, RopeScaling, str]:
    """(rope_theta, scaling, layout) from either config.json layout: transformers ≥ 5's
    ``rope_parameters``, or the older top-level ``rope_theta`` plus ``rope_scaling`` (``type`` or ``rope_type``)."""
    layout = "rope_parameters" if "rope_parameters" in c else "rope_scaling"
    params = dict(c.get(layout) or {})
    if not isinstance(params, dict):
        raise _refuse(layout, f"{params!r} is not a mapping")
    theta = params.pop("rope_theta", c.get("rope_theta", 10000.0))
    names = {params.pop(k) for k in ("rope_type", "type") if k in params}
    if len(names) > 1:
        raise _refuse(f"{layout}.rope_type", f"rope_type and type disagree ({sorted(names)})")
    kind = names.pop() if names else "default"
    if kind not in ROPE_KEYS:
        raise _refuse(f"{layout}.rope_type", f"'{kind}' is not a RoPE variant megadeep models "
                                             f"({', '.join(ROPE_KEYS)})")
    for key in params:
        if key not in ROPE_KEYS[kind]:
            raise _refuse(f"{layout}.{key}", f"not a parameter megadeep models for rope_type '{kind}'")
    values = {k: v for k, v in params.items() if v is not None}
    if kind == "yarn" and "factor" not in values and values.get("original_max_position_embeddings"):
        values["factor"] = c["max_position_embeddings"] / values["original_max_position_embeddings"]
    try:
        scaling = typed(RopeScaling, {"type": kind, **values}, "rope_scaling")
    except ConfigError as e:
        raise _refuse(layout, str(e)) from None
    return float(theta), scaling, layout


def rope_to_hf(m: ModelConfig) -> dict:
    """The RoPE keys of an exported config.json, in the layout the model was imported from."""
    s = m.rope_scaling
    params = {k: getattr(s, k) for k in ROPE_KEYS[s.type] if getattr(s, k)}  # 0: unset (derived by transformers)
    if s.type == "yarn":
        params["truncate"] = s.truncate
    if m.hf_rope_layout == "rope_parameters":
        return {"rope_parameters": {"rope_type": s.type, "rope_theta": m.rope_theta, **params}}
    return {"rope_theta": m.rope_theta, "rope_scaling": None if s.type == "default" else {"rope_type": s.type, **params}}


def hf_config(m: ModelConfig, dtype: str) -> dict:
    if m.deepnorm:
        raise CheckpointError("a model.deepnorm=true model (post-norm with α-scaled residuals) is not a Llama; "
                              "it cannot be exported to a Hugging Face model")
    if m.qkv_bias != FAMILIES[m.family]["qkv_bias"]:
        raise CheckpointError(f"model.qkv_bias={m.qkv_bias} does not match model.family={m.family}, whose q/k/v "
                              f"biases are {'always' if FAMILIES[m.family]['qkv_bias'] else 'never'} there")
    family = {
        "llama": {"attention_bias": False, "mlp_bias": False},
        "mistral": {"sliding_window": m.sliding_window or None},
        "qwen2": {"sliding_window": m.sliding_window or None, "use_sliding_window": False,
                  "max_window_layers": m.n_layers},
    }[m.family]
    config = {
        "architectures": [FAMILIES[m.family]["architecture"]], "model_type": m.family,
        "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.hidden_ffn,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, **rope_to_hf(m), "tie_word_embeddings": m.tie_embeddings, **family,
        "attention_dropout": m.attention_dropout, "initializer_range": m.init_std, "dtype": dtype,
        "use_cache": True,
    }
    return mixtral.extend_config(config, m) if m.moe.enabled else config


def model_config_from_hf(c: dict) -> ModelConfig:
    """The ModelConfig of a config.json; every key is either modelled, known not to matter, or refused."""
    if c.get("model_type") == "mixtral":
        return mixtral.model_config(c, model_config_from_hf)
    family = c.get("model_type")
    if family not in FAMILIES:
        raise _refuse("model_type", f"'{family}' is not one of the families megadeep imports ({', '.join(FAMILIES)})")
    checks = FAMILIES[family]["keys"]
    for key, value in c.items():
        if key in checks:
            problem = checks[key](c, value)
            if problem:
                raise _refuse(key, problem)
        elif key not in MODELLED | INERT:
            raise _refuse(key, "not a setting megadeep models")
    if c.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", f"'{c.get('hidden_act')}' (only silu is modelled)")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads) or c["hidden_size"] % heads:
        raise _refuse("head_dim", f"{c.get('head_dim')} × num_attention_heads={heads} must equal "
                                  f"hidden_size={c['hidden_size']}")
    theta, scaling, layout = rope_from_hf(c)
    return ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads, ffn_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048), norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, qkv_bias=FAMILIES[family]["qkv_bias"],
        sliding_window=c.get("sliding_window") or 0, family=family, hf_rope_layout=layout,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), init_std=c.get("initializer_range", 0.02),
        attention_dropout=c.get("attention_dropout", 0.0), residual_scaling=False,
    )


# --- tensors --------------------------------------------------------------------------------------
def to_hf(name: str, t: torch.Tensor, blocks) -> dict[str, torch.Tensor]:
    """HF tensors of our canonical ``name``; ``blocks``: the sizes of a fused weight's parts."""
    keys = hf_names(name)
    return dict(zip(keys, t.split(list(blocks)) if len(keys) > 1 else (t,), strict=True))


def hf_names(name: str) -> tuple[str, ...]:
    """The HF tensors our canonical ``name`` is made of (several, in order, for a fused weight)."""
    if name in TOP_NAMES:
        return (TOP_NAMES[name],)
    _, layer, rest = name.split(".", 2)
    prefix = f"model.layers.{layer}."
    return tuple(prefix + k for k in (FUSED[rest] if rest in FUSED else
                                      (LAYER_NAMES.get(rest) or mixtral.LAYER_NAMES[rest],)))


def from_hf(name: str, hf: dict[str, torch.Tensor], n_experts: int = 0) -> torch.Tensor:
    """Our canonical tensor ``name`` from an HF state dict (``n_experts``: a Mixtral's, whose experts may
    be stored one by one)."""
    if name not in TOP_NAMES:
        _, layer, rest = name.split(".", 2)
        moe = mixtral.from_hf(f"model.layers.{layer}.", rest, hf, n_experts, _need)
        if moe is not None:
            return moe
    return torch.cat([_need(hf, k) for k in hf_names(name)])


def _check_all_used(hf: dict, specs: dict, tied: bool, n_experts: int = 0) -> None:
    """Every HF tensor must land somewhere: one left over (a bias, an extra norm) is computation
    megadeep would silently drop."""
    used = {k for name in specs for k in hf_names(name)} | ({"lm_head.weight"} if tied else set())
    used |= {k for name in specs if name not in TOP_NAMES
             for k in mixtral.legacy_names(f"model.layers.{name.split('.')[1]}.", name.split(".", 2)[2], n_experts)}
    extra = sorted(k for k in hf if k not in used and not k.endswith("rotary_emb.inv_freq"))  # a cache, not a weight
    if extra:
        raise CheckpointError(f"the Hugging Face weights hold '{extra[0]}' ({len(extra)} unused tensor(s)), which "
                              "megadeep's model has no place for; refusing rather than dropping it")


def _need(hf: dict, key: str) -> torch.Tensor:
    if key not in hf:
        raise CheckpointError(f"the Hugging Face weights have no '{key}'")
    return hf[key]


def export_hf(src: Path, out: Path, dtype: str = "float32", tokenizer: str | None = None) -> Path:
    """Write a folder ``AutoModelForCausalLM.from_pretrained`` loads (the model's family), from a checkpoint
    of any layout, with its tokenizer (``tokenizer``, else the run's ``data.tokenizer``) if there is one."""
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
    tok = tokenizer or ckpt.meta["config"].get("data", {}).get("tokenizer") or ""
    if tok and Path(tok).exists():
        from megadeep.data.tokenizer import HFTokenizer, open_tokenizer

        opened = open_tokenizer(tok)
        if isinstance(opened, HFTokenizer):  # the model's own tokenizer.json (+ tokenizer_config.json), as is
            for f in opened.files():
                shutil.copy(f, out / f.name)
        else:  # a SentencePiece model: HF's LlamaTokenizer reads it
            shutil.copy(opened.path, out / "tokenizer.model")
            (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}) + "\n")
        ids = opened.identity()  # generation stops at the tokenizer's eos
        config.update({f"{k}_token_id": v for k in ("bos", "eos") if isinstance(v := ids.get(f"{k}_id"), int) and v >= 0})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
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
    """Write a weights-only megadeep checkpoint (step 0) for TP=``tp`` from an HF model folder.
    Train from it with ``checkpoint.resume=<the step_00000000 dir>`` (fresh optimizer, step 0)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    m = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    if tp < 1 or m.n_heads % tp or m.kv_heads % tp or m.hidden_ffn % tp:
        raise CheckpointError(f"tp={tp} does not divide the heads ({m.n_heads}), kv-heads ({m.kv_heads}) "
                              f"and FFN width ({m.hidden_ffn})")
    tok = model_tokenizer(folder, m)
    hf = read_hf_weights(folder)
    cfg = RunConfig(model=m)
    cfg.parallel.tp = tp
    if tok is not None:
        cfg.data.source, cfg.data.tokenizer = "tokens", str(folder.resolve())
    meta = {"step": 0, "consumed_samples": 0, "layout": {"tp": tp, "pp": 1, "dp": 1},
            "zero_stage": None, "precision": "fp32", "config": to_dict(cfg), "optimizer": None, "rng": False,
            "source": f"huggingface:{folder}", "tokenizer": tok.identity() if tok is not None else None}
    specs = canonical_specs(m)
    _check_all_used(hf, specs, m.tie_embeddings, m.moe.num_experts)
    step = write_checkpoint(Path(dst_root), meta, specs, lambda kind, name: from_hf(name, hf, m.moe.num_experts).float(),
                            ("model",), tp, m.padded_vocab(tp))
    write_train_config(Path(dst_root) / TRAIN_CONFIG, cfg, step)
    return step


TRAIN_CONFIG = "train.yaml"


def write_train_config(path: Path, cfg: RunConfig, step: Path) -> None:
    """The run config that continues training the imported model: its model section (family, RoPE,
    biases: every fact the weights need), its tokenizer and ``checkpoint.resume``. ``megadeep train``
    takes it with the data, layout and schedule as overrides."""
    import yaml

    tree = {"model": to_dict(cfg.model), "checkpoint": {"resume": str(step.resolve())}}
    if cfg.data.tokenizer:
        tree["data"] = {"source": "tokens", "tokenizer": cfg.data.tokenizer}
    header = (f"# written by `megadeep ckpt import-hf`: continue training with\n"
              f"#   megadeep train {path} data.paths=[<dataset preprocessed with --tokenizer "
              f"{cfg.data.tokenizer or '<its tokenizer>'}>] checkpoint.dir=<new run dir> ...\n")
    path.write_text(header + yaml.safe_dump(tree, sort_keys=False))


def model_tokenizer(folder: Path, m: ModelConfig):
    """The tokenizer a Hugging Face folder ships (``tokenizer.json``, else ``tokenizer.model``), or None;
    refused if it has more pieces than the model has embedding rows."""
    from megadeep.data.tokenizer import open_tokenizer

    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        return None
    try:
        tok = open_tokenizer(folder)
    except DataError as e:
        raise CheckpointError(f"{folder}: its tokenizer cannot be read ({e})") from None
    if tok.vocab_size > m.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tok.vocab_size} pieces but the model only "
                              f"vocab_size={m.vocab_size} embedding rows")
    return tok

