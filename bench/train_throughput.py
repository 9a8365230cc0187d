"""Training tokens/s of megadeep (its Trainer on a DeepSpeed engine, one process) next to Hugging Face
transformers' LlamaForCausalLM of the same shape, in the same run, fp32 on CPU.

Both do forward, backward and an AdamW step on the same batch shape; the ratio is what we report.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import median_time, row, save

# ~134M parameters: the shape of cpu-facts.md's HF measurement (12 × 768, ffn 2048, vocab 32000).
SHAPE = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, seq_len=256, batch=4)
QUICK = dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, ffn_dim=768, seq_len=128, batch=4)


def megadeep_step(shape: dict, workdir: Path):
    from megadeep.config import load_config, resolve
    from megadeep.training.trainer import Trainer

    text = workdir / "text.txt"
    text.write_bytes(bytes(range(256)) * (shape["seq_len"] * shape["batch"] * 4))
    s = shape
    cfg = resolve(load_config(None, [
        f"model.vocab_size={s['vocab_size']}", f"model.dim={s['dim']}", f"model.n_layers={s['n_layers']}",
        f"model.n_heads={s['n_heads']}", f"model.ffn_dim={s['ffn_dim']}", f"model.max_seq_len={s['seq_len']}",
        "model.tie_embeddings=false", "model.vocab_pad_unit=1", f"train.seq_len={s['seq_len']}",
        f"train.micro_batch_size={s['batch']}", f"train.global_batch_size={s['batch']}", "train.steps=1000",
        "deepspeed.config=zero0", "data.val_fraction=0", f"data.paths=[{text}]", "log.progress=false",
    ]), 1)
    trainer = Trainer(cfg)
    return trainer.train_step, trainer


def hf_step(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = shape
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["dim"], intermediate_size=s["ffn_dim"],
        num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"], num_key_value_heads=s["n_heads"],
        max_position_embeddings=s["seq_len"], tie_word_embeddings=False, attn_implementation="sdpa",
    ))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    tokens = torch.randint(0, s["vocab_size"], (s["batch"], s["seq_len"]))

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def run(quick: bool = False, repeats: int = 3) -> dict:
    shape = QUICK if quick else SHAPE
    tokens = shape["seq_len"] * shape["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        md_step, trainer = megadeep_step(shape, Path(tmp))
        md_params = sum(p.numel() for p in trainer.engine.module.parameters())
        md = median_time(md_step, repeats)
        trainer.close()
    hf, hf_params = hf_step(shape)
    hf_s = median_time(hf, repeats)
    result = {
        "shape": shape, "params": {"megadeep": md_params, "hf": hf_params},
        "tokens_per_s": {"megadeep": tokens / md, "hf_transformers": tokens / hf_s},
        "ratio_megadeep_over_hf": hf_s / md,
    }
    return result


def headline(r: dict) -> list[dict]:
    t = r["tokens_per_s"]
    return [row(f"training tokens/s, fp32, {r['params']['megadeep'] / 1e6:.0f}M params, vs HF transformers Llama",
                t["megadeep"], t["hf_transformers"], r["ratio_megadeep_over_hf"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    r = run(args.quick, args.repeats)
    print(f"params: megadeep {r['params']['megadeep'] / 1e6:.1f}M, HF {r['params']['hf'] / 1e6:.1f}M")
    for k, v in r["tokens_per_s"].items():
        print(f"{k:>16}: {v:8.1f} tokens/s")
    print(f"megadeep / HF: {r['ratio_megadeep_over_hf']:.2f}x")
    if not args.quick:
        print("saved", save("train_throughput", r))


if __name__ == "__main__":
    main()
