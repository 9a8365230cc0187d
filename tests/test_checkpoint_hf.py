"""Hugging Face export/import: transformers' LlamaForCausalLM computes our logits; import → export is exact."""
import json

import pytest
import torch

from megadeep.checkpoint.convert import canonical_specs, write_checkpoint
from megadeep.checkpoint.hf import export_hf, import_hf
from megadeep.config.load import to_dict
from megadeep.config.schema import ModelConfig, RunConfig
from megadeep.errors import CheckpointError
from megadeep.model import Transformer
from tests.helpers import rel_err

VARIANTS = {
    "gqa-tied": dict(n_heads=8, n_kv_heads=2, tie_embeddings=True),
    "gqa-untied": dict(n_heads=8, n_kv_heads=4, tie_embeddings=False),
    "mha-untied": dict(n_heads=4, n_kv_heads=None, tie_embeddings=False),
}


def trained_like_model(variant: str) -> Transformer:
    """A model with non-trivial weights everywhere (norms too) and a vocab that TP pads."""
    m = ModelConfig(vocab_size=250, dim=64, n_layers=2, ffn_dim=96, max_seq_len=64, rope_theta=5000.0,
                    norm_eps=1e-5, **VARIANTS[variant])
    model = Transformer(m)
    model.init_weights(seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.eval()


def save(model: Transformer, root, step=3):
    cfg = RunConfig(model=model.cfg)
    specs = canonical_specs(model.cfg)
    params = dict(model.named_parameters())
    meta = {"step": step, "consumed_samples": 0, "layout": {"tp": 1, "pp": 1, "dp": 1},
            "config": to_dict(cfg), "optimizer": None, "rng": False}
    full = lambda kind, name: params[name].detach()[: specs[name].shape[0]]  # noqa: E731 (drop vocab padding)
    return write_checkpoint(root, meta, specs, full, ("model",), 1, model.cfg.padded_vocab(1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_matches_transformers_and_import_round_trips(variant, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = trained_like_model(variant)
    out = export_hf(save(model, tmp_path / "run"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 5000.0 and config["dtype"] == "float32"

    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings
    tokens = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)[..., :250]
        theirs = hf(tokens).logits
    err = rel_err(ours, theirs)
    print(f"{variant}: logits rel err vs transformers {err:.2e}")
    assert err < 1e-5

    # import into TP=2 (vocab padded differently), export again: bit-identical weights and config
    imported = import_hf(out, tmp_path / "imported", tp=2)
    again = export_hf(imported, tmp_path / "hf2")
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "config.json").read_text()) == config


def test_import_refuses_pickle_weights(tmp_path):
    model = trained_like_model("gqa-tied")
    out = export_hf(save(model, tmp_path / "run"), tmp_path / "hf")
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        import_hf(out, tmp_path / "imported")


def test_deepnorm_is_not_exported(tmp_path):
    m = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, deepnorm=True, residual_scaling=False)
    model = Transformer(m)
    with pytest.raises(CheckpointError, match="deepnorm"):
        export_hf(save(model, tmp_path / "run"), tmp_path / "hf")
