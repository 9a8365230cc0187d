"""Hugging Face families and RoPE variants: an imported model computes transformers' logits at TP=1,
TP=2 and TP=2 with sequence parallel; its export loads in transformers, in the family and config.json
layout it came from, with the same logits; every config key megadeep does not model is refused."""
import json
import os

import pytest
import torch

from megadeep.checkpoint.hf import export_hf, import_hf
from megadeep.checkpoint.store import Checkpoint
from megadeep.cli import main
from megadeep.config.schema import RopeScaling
from megadeep.model import Transformer
from tests.helpers import ROOT, read_json, rel_err, run_torchrun
from tests.hf_models import SCALED, VARIANTS, hf_logits, load_weights, make_hf_model, tokens

TP2 = [v for v in VARIANTS if VARIANTS[v][1]["num_key_value_heads"] % 2 == 0]  # MQA's one kv-head cannot be split


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every variant made, read back by transformers (the reference), imported for TP=1 and TP=2."""
    root, t = tmp_path_factory.mktemp("hf"), tokens()
    out = {}
    for v in VARIANTS:
        case = root / v
        src = make_hf_model(v, case / "hf")
        ref = hf_logits(src, t)
        step1 = import_hf(src, case / "ckpt1", tp=1)
        if v in TP2:
            import_hf(src, case / "ckpt", tp=2)
            torch.save(t, case / "tokens.pt")
            torch.save(ref, case / "ref.pt")
        out[v] = (case, src, step1, ref)
    return out


def megadeep_logits(step, t, **model_changes):
    cfg = Checkpoint.open(step).model_config
    for k, val in model_changes.items():
        setattr(cfg, k, val)
    model = Transformer(cfg).eval()
    load_weights(model, step)
    with torch.no_grad():
        return model(t)[..., : cfg.vocab_size]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers_and_export_round_trips(variant, cases, tmp_path):
    case, src, step, ref = cases[variant]
    t = tokens()
    err = rel_err(megadeep_logits(step, t), ref)
    print(f"{variant}: TP=1 import logits rel err {err:.2e}")
    assert err < 1e-5
    if variant in SCALED:  # the scaling is really applied: plain RoPE would be far off
        assert rel_err(megadeep_logits(step, t, rope_scaling=RopeScaling()), ref) > 1e-3

    out = export_hf(step, tmp_path / "out")
    source, exported = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert exported["model_type"] == source["model_type"] and exported["architectures"] == source["architectures"]
    for layout_key in ("rope_parameters", "rope_scaling"):  # the layout it came from
        assert (layout_key in exported) == (layout_key in source)
    err = rel_err(hf_logits(out, t), ref)
    print(f"{variant}: transformers on the export, logits rel err {err:.2e}")
    assert err < 1e-5


def test_tp2_and_sequence_parallel_match_transformers(cases, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run_torchrun("hf_tp.py", 2, str(tmp_path / "out.json"), *[str(cases[v][0]) for v in TP2], env=env)
    errors = read_json(tmp_path / "out.json")
    print(json.dumps(errors, indent=1))
    assert sorted(errors) == sorted(f"{v}/{m}" for v in TP2 for m in ("tp", "sp"))
    assert max(errors.values()) < 1e-5


# config.json key -> a value megadeep does not model (each refused with one line naming the key)
REFUSED = {
    "llama": {
        "attention_bias": True, "mlp_bias": True, "hidden_act": "gelu", "head_dim": 32, "model_type": "gemma",
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0},
        "rope_parameters.partial_rotary_factor": 0.5, "rope_parameters.mrope_section": [2, 2],
        "rope_scaling": {"type": "su", "factor": 2.0}, "rope_scaling.beta_fast": 32.0,
        "num_experts": 8, "attn_logit_softcapping": 50.0,
    },
    "mistral": {"sliding_window": 16},
    "qwen2": {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"], "use_mrope": True},
}


def _refused_config(cases, family, key, value):
    variant = {"llama": "llama3-gqa-untied", "mistral": "mistral-mqa", "qwen2": "qwen2-tied"}[family]
    config = json.loads((cases[variant][1] / "config.json").read_text())
    if key.startswith("rope_scaling"):  # the older layout
        config.pop("rope_parameters")
        config["rope_theta"] = 10000.0
    if key.startswith("rope_parameters."):
        config["rope_parameters"][key.split(".", 1)[1]] = value
    elif key == "rope_scaling.beta_fast":
        config["rope_scaling"] = {"type": "linear", "factor": 2.0, "beta_fast": value}
    else:
        config[key] = value
    if key == "use_sliding_window":
        config["sliding_window"] = 16
    return config


@pytest.mark.parametrize("family,key", [(f, k) for f, keys in REFUSED.items() for k in keys])
def test_unmodelled_config_key_is_refused(family, key, cases, tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    variant = {"llama": "llama3-gqa-untied", "mistral": "mistral-mqa", "qwen2": "qwen2-tied"}[family]
    (folder / "model.safetensors").symlink_to(cases[variant][1] / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(_refused_config(cases, family, key, REFUSED[family][key])))
    assert main(["ckpt", "import-hf", str(folder), str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megadeep: error: config.json: ")
    name = key.split(".")[0] if key in ("rope_parameters", "rope_scaling") else key
    if key in ("rope_parameters", "rope_scaling"):
        name += ".rope_type"
    assert f" {name}:" in err[0], err[0]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_unused_hf_tensor_is_refused(cases, tmp_path):
    from safetensors.torch import load_file, save_file

    from megadeep.errors import CheckpointError

    folder = tmp_path / "hf"
    folder.mkdir()
    src = cases["llama3-gqa-untied"][1]
    (folder / "config.json").write_text((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="o_proj.bias"):
        import_hf(folder, tmp_path / "ckpt")


ROPE_CASES = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 2.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn-mscale": {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 1.0},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("seq_len", [48, 100])  # 100 > max_position_embeddings: dynamic NTK rescales
def test_rope_frequencies_match_transformers(case, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megadeep.checkpoint.hf import rope_from_hf
    from megadeep.model.rope import inv_freq_and_scale

    kind = case.split("-")[0]
    params = {"rope_type": kind, "rope_theta": 10000.0, **ROPE_CASES[case]}
    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_parameters=params)
    theirs, their_scale = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu", seq_len=seq_len)
    theta, scaling, _ = rope_from_hf({"max_position_embeddings": 64, "rope_parameters": params})
    ours, our_scale = inv_freq_and_scale(16, theta, scaling, 64, seq_len, "cpu")
    assert rel_err(ours, theirs) < 1e-6 and abs(our_scale - their_scale) < 1e-6
    assert rel_err(ours, inv_freq_and_scale(16, theta, RopeScaling(), 64, seq_len, "cpu")[0]) > 1e-3 or (
        kind == "dynamic" and seq_len <= 64)  # plain RoPE within the context, by definition


def test_bad_rope_settings_in_a_run_config_are_refused():
    from megadeep.config import load_config, resolve
    from megadeep.errors import ConfigError

    for override, match in [("model.rope_scaling.type=longrope", "model.rope_scaling.type"),
                            ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor"),
                            ("model.rope_scaling.scale=2", "unknown config key 'model.rope_scaling.scale'"),
                            ("model.family=gemma", "model.family"),
                            ("model.sliding_window=16", "model.sliding_window")]:
        with pytest.raises(ConfigError, match=match):
            resolve(load_config(None, [override, "model.vocab_size=256", "data.source=bytes"]), 1, require_data=False)
    cfg = resolve(load_config(None, ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8",
                                     "model.rope_scaling.original_max_position_embeddings=64"]), 1, require_data=False)
    assert cfg.model.rope_scaling == RopeScaling(type="llama3", factor=8.0, original_max_position_embeddings=64)


def test_qkv_bias_is_counted_once():
    from megadeep.config.schema import ModelConfig
    from megadeep.model.accounting import num_params

    m = ModelConfig(vocab_size=100, dim=64, n_heads=4, n_kv_heads=2, qkv_bias=True, tie_embeddings=False)
    assert num_params(m) == sum(p.numel() for p in Transformer(m).parameters()) - (m.padded_vocab(1) - 100) * 64 * 2


def test_biases_and_scaled_rope_train_like_single_process(tmp_path):
    """q/k/v biases (sharded with their heads) and YaRN RoPE under TP=2 + SP and TP=2 × DP=2 (ZeRO-1) and
    a pipeline: per-step loss and grad norm equal the single-process run's."""
    from tests.helpers import run_parity, write_text

    text = write_text(tmp_path / "text.txt")
    ref = run_parity(tmp_path / "ref.json", text, ["zero=1,warmup=5,qwen"])["zero=1,warmup=5,qwen"]
    specs = ["tp=2,zero=1,sp,warmup=5,qwen", "tp=2,zero=1,warmup=5,qwen", "pp=2,zero=1,warmup=5,qwen"]
    results = run_parity(tmp_path / "out.json", text, specs, 4)
    for spec, r in results.items():
        assert rel_err(r["loss"], ref["loss"]) < 1e-5 and rel_err(r["grad_norm"], ref["grad_norm"]) < 1e-5, spec
    assert ref["loss"][-1] < ref["loss"][0] - 0.5
