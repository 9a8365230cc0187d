"""Continued pre-training of a Hugging Face model end to end, through the CLI: a Llama-3.1-style model
(llama3 RoPE, GQA) and a byte-level BPE tokenizer made locally are imported (TP=2), the bundled corpus is
preprocessed with that tokenizer, 20 steps run at TP=2 × DP=2, the result is exported, and transformers'
loss on a held-out batch equals megadeep's. Data made with another tokenizer is refused before launch."""
import json
import subprocess
import sys

import pytest
import torch

from megadeep.checkpoint.store import Checkpoint
from megadeep.cli import main
from megadeep.data.corpora import corpus_files
from megadeep.data.tokenizer import open_tokenizer
from megadeep.model import Transformer
from tests.helpers import ROOT
from tests.hf_models import load_weights, make_bpe_tokenizer, make_hf_model

VOCAB = 512


def megadeep(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "megadeep", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"megadeep {' '.join(map(str, args))}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def held_out_batch(folder, text_file) -> torch.Tensor:
    ids = open_tokenizer(folder).encode(open(text_file, encoding="utf-8").read()[:20000])
    return torch.as_tensor(ids[: 4 * 33].astype("int64")).view(4, 33)


def megadeep_loss(step, batch) -> float:
    model = Transformer(Checkpoint.open(step).model_config).eval()
    load_weights(model, step)
    with torch.no_grad():
        return model(batch[:, :-1], batch[:, 1:]).item()


def transformers_loss(folder, batch) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(batch, labels=batch).loss.item()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt")
    files = corpus_files("shakespeare")
    train_files, held_out = files[:8], files[-1]
    hf = make_bpe_tokenizer(root / "hf", train_files, VOCAB)
    make_hf_model("llama3.1-llama3-new", hf, seed=3, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    out = megadeep("ckpt", "import-hf", hf, root / "imported", "--tp", 2, cwd=root)
    assert "step_00000000" in out
    megadeep("data", "preprocess", *train_files, "--tokenizer", hf, "--out", root / "data", "--workers", 1,
             "--set", "quality.max_dup_line_frac=0.4", cwd=root)
    return root, hf, held_out


def test_import_preprocess_train_export_matches_transformers(imported):
    root, hf, held_out = imported
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "huggingface" and manifest["tokenizer"]["vocab_size"] == VOCAB
    first_doc = open(root / "data" / "shard_00000.bin", "rb").read(4)
    assert int.from_bytes(first_doc[:2], "little") == 0  # the tokenizer's own bos starts each document

    config = root / "imported" / "train.yaml"
    megadeep("train", config, f"data.paths=[{root / 'data'}]", "parallel.tp=2", "train.steps=20", "train.seq_len=32",
             "train.micro_batch_size=2", "train.global_batch_size=8", "optim.lr=0.003", "optim.warmup_steps=5",
             "train.eval_every=0", f"checkpoint.dir={root / 'run'}", f"log.metrics_file={root / 'metrics.jsonl'}",
             "log.progress=false", "--nproc", 4, cwd=root)
    steps = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) == 20 and sum(losses[-3:]) < sum(losses[:3]) - 1.0, losses  # it trained

    final = next((root / "run").glob("step_00000020"))
    assert Checkpoint.open(final).meta["layout"] == {"tp": 2, "pp": 1, "dp": 2}
    megadeep("ckpt", "export-hf", root / "run", root / "exported", cwd=root)
    exported = json.loads((root / "exported" / "config.json").read_text())
    assert exported["rope_parameters"]["rope_type"] == "llama3" and (root / "exported" / "tokenizer.json").is_file()
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (0, 1)  # from the tokenizer

    batch = held_out_batch(hf, held_out)
    ours, theirs = megadeep_loss(final, batch), transformers_loss(root / "exported", batch)
    before = transformers_loss(hf, batch)
    print(f"held-out loss: imported {before:.4f}, after 20 steps megadeep {ours:.6f} transformers {theirs:.6f}")
    assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    assert theirs < before - 0.5


def test_data_of_another_tokenizer_is_refused(imported, tmp_path, capsys):
    root, hf, _ = imported
    other = make_bpe_tokenizer(tmp_path / "other", corpus_files("shakespeare")[:2], 400)
    megadeep("data", "preprocess", corpus_files("shakespeare")[0], "--tokenizer", other, "--out", tmp_path / "data",
             "--workers", 1, "--set", "quality.max_dup_line_frac=0.4", cwd=tmp_path)
    config = str(root / "imported" / "train.yaml")
    base = [f"data.paths=[{tmp_path / 'data'}]", "parallel.tp=2", "train.seq_len=32", "train.micro_batch_size=2",
            "train.global_batch_size=8", "--nproc", "4"]
    for pin in ([], ["data.tokenizer="]):  # the imported config pins the tokenizer; without it, the checkpoint does
        assert main(["train", config, *base, *pin]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "tokenizer" in err[0], err
        print(err[0])
