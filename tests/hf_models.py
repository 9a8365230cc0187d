"""Small random Hugging Face models of each family and RoPE variant megadeep imports, written the way
published checkpoints are (either config.json layout), and loading a megadeep checkpoint into a bare model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPE = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5)
SEQ = 48  # longer than the scaled variants' original context (16), so their scaling shows in the logits
# name -> (model_type, config kwargs, rope parameters, config.json layout: "new" | "legacy-rope_type" | "legacy-type")
VARIANTS = {
    "llama2-mha-untied": ("llama", dict(num_key_value_heads=4), {"rope_type": "default", "rope_theta": 10000.0}, "legacy-type"),
    "llama3-gqa-untied": ("llama", dict(num_key_value_heads=2), {"rope_type": "default", "rope_theta": 500000.0}, "new"),
    "llama3.1-llama3-new": ("llama", dict(num_key_value_heads=2), {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, "new"),
    "llama3.2-llama3-legacy-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True), {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, "legacy-rope_type"),
    "linear-new": ("llama", dict(num_key_value_heads=2), {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, "new"),
    "linear-legacy-type": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True),
                           {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, "legacy-type"),
    "yarn-new": ("llama", dict(num_key_value_heads=2), {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}, "new"),
    "dynamic-legacy": ("llama", dict(num_key_value_heads=2), {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                       "legacy-rope_type"),
    "mistral-mqa": ("mistral", dict(num_key_value_heads=1, sliding_window=None), {"rope_type": "default", "rope_theta": 1e6}, "new"),
    "mistral-window-legacy": ("mistral", dict(num_key_value_heads=2, sliding_window=64),
                              {"rope_type": "default", "rope_theta": 10000.0}, "legacy-rope_type"),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), {"rope_type": "default", "rope_theta": 1e6}, "new"),
    "qwen2.5-untied-legacy": ("qwen2", dict(num_key_value_heads=2), {"rope_type": "default", "rope_theta": 1e6},
                              "legacy-rope_type"),
}
SCALED = [v for v, (_, _, rope, _) in VARIANTS.items() if rope["rope_type"] in ("llama3", "linear", "yarn")]


def config_class(model_type: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]


def to_legacy(config: dict, key: str) -> dict:
    """The pre-transformers-5 layout of a config.json: top-level rope_theta, rope_scaling[type|rope_type]."""
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {key: kind, **rope}
    return config


def make_hf_model(variant: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A random model of ``variant`` saved in ``folder`` (every weight non-trivial: norms, biases too)."""
    from transformers import AutoModelForCausalLM

    model_type, kwargs, rope, layout = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = config_class(model_type)(**{**SHAPE, "tie_word_embeddings": False, **kwargs, **overrides},
                                   rope_parameters=dict(rope))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    if layout != "new":
        path = Path(folder) / "config.json"
        config = to_legacy(json.loads(path.read_text()), layout.split("-", 1)[1])
        path.write_text(json.dumps(config, indent=2))
    return Path(folder)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def load_weights(model: torch.nn.Module, step_dir: Path, tp_rank: int = 0, tp: int = 1) -> None:
    """Copy a checkpoint's weights into a bare megadeep model built for TP=``tp`` (this rank's pieces)."""
    from megadeep.checkpoint.store import Checkpoint
    from megadeep.checkpoint.tensors import TensorReader

    ckpt = Checkpoint.open(Path(step_dir))
    reader = TensorReader(ckpt)
    padded = ckpt.model_config.padded_vocab(tp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reader.piece("model", name, tp_rank, tp, padded))


def tokens(seed: int = 0, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))



def make_bpe_tokenizer(folder: Path, files: list[str], vocab_size: int = 512) -> Path:
    from megadeep.data.tokenizer import train_hf_bpe

    return train_hf_bpe((Path(f).read_text(encoding="utf-8") for f in files), folder, vocab_size)
