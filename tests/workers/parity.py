"""Train several layouts in one launch (same seed, same data) and record per-step loss and grad norm.

argv: OUT.json TEXT_FILE SPEC [SPEC ...], SPEC = "tp=2,zero=1[,sp][,untied][,pp=2][,fused=on|off]" (DP is what is left).
Used as a plain single process (the reference) or under torchrun.
"""
import json
import sys

from megadeep.config import load_config, resolve
from megadeep.launch.env import discover
from megadeep.training.trainer import train

TINY = [
    "model.vocab_size=256", "model.dim=64", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4",
    "model.ffn_dim=128", "model.max_seq_len=32", "train.seq_len=32", "train.micro_batch_size=2",
    "train.global_batch_size=8", "train.steps=10", "optim.lr=0.003", "optim.min_lr=0.0003",
    "optim.warmup_steps=3", "log.progress=false",
]


def overrides(spec: str) -> list[str]:
    out = []
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key == "zero":
            out.append(f"deepspeed.config=zero{value}")
        elif key in ("tp", "pp"):
            out.append(f"parallel.{key}={value}")
        elif key == "sp":
            out.append("parallel.sequence_parallel=true")
        elif key == "untied":
            out.append("model.tie_embeddings=false")
        elif key == "fused":
            out.append(f"model.fused_kernels={value}")
        elif key == "ckpt":
            out.append("model.activation_checkpointing=true")
        else:
            raise SystemExit(f"bad spec item {item}")
    return out


def main():
    out_path, text, *specs = sys.argv[1:]
    world = discover().world_size
    results = {}
    for spec in specs:
        cfg = resolve(load_config(None, TINY + [f"data.paths=[{text}]"] + overrides(spec)), world)
        summary = train(cfg)
        results[spec] = {
            "loss": [r.loss for r in summary.history],
            "grad_norm": [r.grad_norm for r in summary.history],
        }
    if discover().rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
