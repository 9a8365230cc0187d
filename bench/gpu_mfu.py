"""MFU of a ~1.1B-parameter Llama (TinyLlama's shape) training in bf16 on one GPU, through megadeep's
Trainer (DeepSpeed engine, ZeRO-1, fused kernels when built). Skipped without a CUDA device."""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

SHAPE = dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, seq_len=2048,
             micro_batch=4, steps=12)


def run(quick: bool = False) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from megadeep.config import load_config, resolve
    from megadeep.training.trainer import train

    s = dict(SHAPE, n_layers=4, steps=6) if quick else SHAPE
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_bytes(bytes(range(256)) * (s["seq_len"] * s["micro_batch"] * 8))
        cfg = resolve(load_config(None, [
            f"model.vocab_size={s['vocab_size']}", f"model.dim={s['dim']}", f"model.n_layers={s['n_layers']}",
            f"model.n_heads={s['n_heads']}", f"model.n_kv_heads={s['n_kv_heads']}", f"model.ffn_dim={s['ffn_dim']}",
            f"model.max_seq_len={s['seq_len']}", "model.tie_embeddings=false", f"train.seq_len={s['seq_len']}",
            f"train.micro_batch_size={s['micro_batch']}", f"train.global_batch_size={s['micro_batch']}",
            f"train.steps={s['steps']}", "optim.warmup_steps=2", "train.precision=bf16", "train.device=cuda",
            "deepspeed.config=zero1", "data.val_fraction=0", f"data.paths=[{text}]", "log.progress=false",
        ]), 1)
        records = train(cfg).records
    steady = records[2:]  # the first steps include allocator warm-up and kernel selection
    return {
        "shape": s, "device": torch.cuda.get_device_name(),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "tflops_per_device": statistics.median(r["tflops_per_device"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "max_allocated_gb": max(r["memory"]["max_allocated_mb"] for r in records) / 1024,
    }


def headline(r: dict) -> list[dict]:
    from bench.common import row

    s = r["shape"]
    return [row(f"MFU, {s['n_layers']}-layer Llama (dim {s['dim']}) bf16 on {r['device']}, "
                f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_device']:.0f} TFLOP/s", r["mfu"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    r = run(args.quick)
    print(r)
    if "skipped" not in r and not args.quick:
        from bench.common import save

        print("saved", save("gpu_mfu", r))


if __name__ == "__main__":
    main()
