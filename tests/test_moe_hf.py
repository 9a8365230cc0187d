"""MoE model math against transformers' MixtralForCausalLM: exported logits match, import → export is exact."""
import json

import pytest
import torch

from megadeep.checkpoint.hf import export_hf, import_hf
from megadeep.config.schema import ModelConfig, MoEConfig
from megadeep.errors import CheckpointError
from megadeep.model import Transformer
from tests.helpers import rel_err
from tests.test_checkpoint_hf import save


def moe_model(experts: int, top_k: int = 2, **moe) -> Transformer:
    m = ModelConfig(vocab_size=250, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                    tie_embeddings=False, moe=MoEConfig(num_experts=experts, top_k=top_k, ffn_dim=48, **moe))
    model = Transformer(m)
    model.init_weights(seed=7)
    with torch.no_grad():  # a router that prefers some experts: routing decisions matter for the logits
        for layer in model.layers:
            layer.feed_forward.router.weight.mul_(20.0)
    return model.eval()


@pytest.mark.parametrize("experts", [4, 8])
def test_export_matches_mixtral_and_import_round_trips(experts, tmp_path):
    from transformers import MixtralForCausalLM

    model = moe_model(experts)
    out = export_hf(save(model, tmp_path / "run"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == experts
    hf = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)[..., :250]
        theirs = hf(tokens).logits
        # the routing is not degenerate: tokens spread over the experts, two per token
        ff = model.layers[0].feed_forward
        model(tokens)
        assert (ff.stats["load"] > 0).sum() >= experts // 2
    err = rel_err(ours, theirs)
    print(f"{experts} experts: logits rel err vs MixtralForCausalLM {err:.2e}")
    assert err < 1e-5

    # import into TP=2 and export again; and transformers' own save (whatever expert layout it writes)
    hf.save_pretrained(tmp_path / "saved")
    for i, (folder, tp) in enumerate([(out, 2), (tmp_path / "saved", 1)]):
        again = export_hf(import_hf(folder, tmp_path / f"imported{i}", tp=tp), tmp_path / f"again{i}")
        assert_same_weights(out, again)
        assert json.loads((again / "config.json").read_text()) == config


def assert_same_weights(a_dir, b_dir):
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_top1_and_top3_match_mixtral(tmp_path):
    from transformers import MixtralForCausalLM

    for k in (1, 3):
        model = moe_model(4, top_k=k)
        out = export_hf(save(model, tmp_path / f"run{k}"), tmp_path / f"hf{k}")
        hf = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokens = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert rel_err(model(tokens)[..., :250], hf(tokens).logits) < 1e-5


def test_non_mixtral_moe_is_refused(tmp_path):
    model = moe_model(4, shared_experts=1)
    with pytest.raises(CheckpointError, match="cannot be exported as Mixtral"):
        export_hf(save(model, tmp_path / "run"), tmp_path / "hf")
