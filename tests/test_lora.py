"""LoRA: TP=2 × DP=2 under ZeRO 1 and 3 trains the single process's adapters, the base stays bitwise
the base checkpoint with no gradient or optimizer state, and the PEFT export (on the exported base, in
transformers + peft) and the merged export both compute megadeep's logits."""
import json
import subprocess
import sys

import pytest
import torch

from megadeep.checkpoint.convert import open_source
from megadeep.checkpoint.tensors import TensorReader
from megadeep.config import load_config, resolve
from megadeep.config.schema import ModelConfig
from megadeep.errors import ConfigError
from megadeep.model import Transformer
from tests.helpers import ROOT, WORKERS, read_json, rel_err, run_torchrun, write_text
from tests.test_checkpoint_hf import save

SINGLE, LAYOUTS = "tp=1,zero=0", ["tp=2,zero=1", "tp=2,zero=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    text = write_text(tmp / "text.txt", 8000)
    m = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=128, max_seq_len=32)
    model = Transformer(m)
    model.init_weights(seed=11)
    base = save(model, tmp / "base", step=0)
    single = subprocess.run([sys.executable, str(WORKERS / "lora.py"), str(tmp / "single.json"), str(text), str(base),
                             "-", SINGLE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-4000:]
    run_torchrun("lora.py", 4, str(tmp / "multi.json"), str(text), str(base), "-", *LAYOUTS)
    return tmp, base, {**read_json(tmp / "single.json"), **read_json(tmp / "multi.json")}


def adapters(tmp, spec) -> dict:
    ckpt = open_source(tmp / spec.replace(",", "_").replace("=", ""))
    reader = TensorReader(ckpt)
    return {n: reader.full("model", n) for n in reader.specs}


def test_lora_tp2_dp2_zero1_zero3_equal_single_process(runs):
    tmp, _, results = runs
    ref, ref_adapters = results[SINGLE], adapters(tmp, SINGLE)
    # adapters compared like every parity test (max |a-b| / max |b| per tensor); fp32 reductions over
    # other TP/DP splits leave ~5e-6 after 10 Adam steps, where updates of near-zero gradients amplify noise
    assert ref["loss"][-1] < ref["loss"][0] - 0.2  # the adapters learn
    assert len(ref_adapters) == 2 * 4 * 2 and all(".lora." in n for n in ref_adapters)  # only adapters saved
    assert all(t.abs().max() > 0 for t in ref_adapters.values())
    for spec in [SINGLE, *LAYOUTS]:
        r = results[spec]
        assert r["base_unchanged"], spec  # bitwise, and no gradient
        # fp32 master + two Adam moments of the adapters only, partitioned over DP
        assert r["optimizer_bytes"] == 12 * r["adapter_params_tp"] // r["dp"], (spec, r)
        assert r["optimizer_bytes"] < 12 * r["base_params_tp"] / r["dp"] / 10
        if spec == SINGLE:
            continue
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(r["loss"], ref["loss"], strict=True))
        ours = adapters(tmp, spec)
        weight_err = max(rel_err(ours[n], ref_adapters[n]) for n in ref_adapters)
        print(f"{spec}: loss rel err {loss_err:.1e}, adapter rel err {weight_err:.1e}, "
              f"optimizer bytes/rank {r['optimizer_bytes']} (single process {ref['optimizer_bytes']})")
        assert loss_err <= 1e-5 and weight_err <= 1e-5, spec


def test_peft_export_and_merge_give_megadeep_logits(runs):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from megadeep.checkpoint.hf import export_hf
    from megadeep.inference.load import load_model

    tmp, base, _ = runs
    src = tmp / LAYOUTS[1].replace(",", "_").replace("=", "")
    model, _ = load_model(src)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = model(tokens)[..., :256]
    assert rel_err(load_model(base)[0](tokens)[..., :256], ours) > 0.1  # the adapters matter
    for args in (["export-peft", str(src), str(tmp / "peft")], ["merge", str(src), str(tmp / "merged")]):
        proc = subprocess.run([sys.executable, "-m", "megadeep", "lora", *args], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    hf = LlamaForCausalLM.from_pretrained(export_hf(base, tmp / "hf_base"), dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, tmp / "peft").eval()(tokens).logits
        merged = LlamaForCausalLM.from_pretrained(export_hf(tmp / "merged", tmp / "hf_merged"), dtype=torch.float32)
        merged_logits = merged.eval()(tokens).logits
    print(f"PEFT logits rel err {rel_err(ours, theirs):.1e}, merged {rel_err(ours, merged_logits):.1e}")
    assert rel_err(ours, theirs) <= 1e-5 and rel_err(ours, merged_logits) <= 1e-5


@pytest.mark.parametrize("override,message", [
    ("finetune.lora.targets=[qkv,ffn]", "finetune.lora.targets"),
    ("finetune.lora.alpha=0", "alpha"),
    ("finetune.lora.dropout=1.0", "dropout"),
    ("parallel.sequence_parallel=true", "sequence_parallel=false"),
    ("finetune.base=/nonexistent", "finetune.base"),
    ("parallel.pp=2", "parallel.pp=1"),
])
def test_lora_settings_are_checked(override, message, tmp_path):
    text = write_text(tmp_path / "t.txt", 2000)
    cfg = load_config(None, ["finetune.lora.rank=4", f"data.paths=[{text}]", "parallel.tp=2", override])
    with pytest.raises(ConfigError, match=message):
        resolve(cfg, 4)


def test_lora_run_resumes_from_its_adapter_checkpoint(runs, tmp_path):
    """A LoRA checkpoint holds the adapters and their Adam state only; a run continues from it exactly."""
    tmp, base, results = runs
    first, second = tmp_path / "first", tmp_path / "second"
    second.mkdir()
    for out, extra in ((first / "r.json", "checkpoint.save_every=5"),  # the same 10 steps, saving step 5 too
                       (second / "r.json", f"checkpoint.resume={first / 'tp1_zero0' / 'step_00000005'}")):
        proc = subprocess.run([sys.executable, str(WORKERS / "lora.py"), str(out), str(tmp / "text.txt"), str(base),
                               extra, SINGLE], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
    resumed, straight = read_json(second / "r.json")[SINGLE]["loss"], results[SINGLE]["loss"]
    assert len(resumed) == 5 and resumed == straight[5:]
    ours, ref = adapters(second, SINGLE), adapters(tmp, SINGLE)
    assert all(torch.equal(ours[n], ref[n]) for n in ref)


def test_lora_dropout_is_seeded_and_reproducible(runs):
    """Two single-process runs with adapter dropout and the same seed give the same losses; the
    dropout is live (the losses differ from the dropout-free run's)."""
    tmp, base, results = runs
    specs = ["tp=1,zero=0,run=a", "tp=1,zero=0,run=b"]  # run= only names a separate checkpoint folder
    proc = subprocess.run([sys.executable, str(WORKERS / "lora.py"), str(tmp / "dropout.json"), str(tmp / "text.txt"),
                           str(base), "finetune.lora.dropout=0.3", *specs],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = (read_json(tmp / "dropout.json")[s]["loss"] for s in specs)
    assert a == b
    assert max(abs(x - y) for x, y in zip(a, results[SINGLE]["loss"], strict=True)) > 1e-4
