"""Train several layouts in one launch (same seed, same data) and record per-step loss and grad norm.

argv: OUT.json TEXT_FILE SPEC [SPEC ...],
SPEC = "tp=2,zero=1[,pp=2][,sp][,untied][,ckpt][,layers=4][,warmup=5][,uniform|blocks][,pckpt=K][,drop][,resume=K][,fused=on|off][,qwen][,compile]
[,cp=2][,cpa=ulysses|allgather][,docs|docpos][,moe=E][,ep=N][,cap=F]"
(DP is what is left; pckpt: pipeline activation checkpointing every K layers; drop: dropout 0.1; docs:
document masking, docpos: with per-document RoPE positions;
moe: E top-2 experts in every layer; ep: expert parallel size; cap: capacity factor).
``resume=K`` saves a DeepSpeed checkpoint after K steps and trains the rest in a fresh engine loaded
from it. Pipeline layouts also record how far the tied embedding's stage copies drifted apart.
Used as a plain single process (the reference) or under torchrun.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megadeep.config import load_config, resolve
from megadeep.launch.env import discover
from megadeep.training.trainer import Trainer

TINY = [
    "model.vocab_size=256", "model.dim=64", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4",
    "model.ffn_dim=128", "model.max_seq_len=32", "train.seq_len=32", "train.micro_batch_size=2",
    "train.global_batch_size=8", "train.steps=10", "optim.lr=0.003", "optim.min_lr=0.0003",
    "optim.warmup_steps=3", "log.progress=false",
]


# spec item -> overrides; "{}" takes the item's value
SPEC_ITEMS = {
    "zero": ["deepspeed.config=zero{}"],
    "tp": ["parallel.tp={}"],
    "pp": ["parallel.pp={}"],
    "sp": ["parallel.sequence_parallel=true"],
    "untied": ["model.tie_embeddings=false"],
    "fused": ["model.fused_kernels={}"],
    "ckpt": ["model.activation_checkpointing=true"],
    "compile": ["train.compile=true"],
    "layers": ["model.n_layers={}"],
    "warmup": ["optim.warmup_steps={}"],
    "uniform": ["parallel.partition_method=uniform"],
    "blocks": ["parallel.partition_method=type:Block"],
    "pckpt": ["parallel.pipeline_checkpoint_interval={}"],
    "drop": ["model.dropout=0.1", "model.attention_dropout=0.1"],
    "qwen": ["model.qkv_bias=true", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
             "model.rope_scaling.original_max_position_embeddings=8"],  # q/k/v biases + scaled RoPE
    "cp": ["parallel.cp={}"],
    "cpa": ["parallel.cp_attention={}"],
    "docs": ["data.document_mask=true"],
    "docpos": ["data.document_mask=true", "data.document_positions=true"],
    "resume": [],  # not a config key: see train_layout
    "moe": ["model.moe.num_experts={}", "model.moe.top_k=2", "model.moe.ffn_dim=64", "model.moe.z_loss_coef=0.001",
            "model.moe.aux_loss_coef=0.02"],
    "ep": ["parallel.ep={}"],
    "cap": ["model.moe.capacity_factor={}"],
}


def overrides(spec: str) -> list[str]:
    out = []
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in SPEC_ITEMS:
            raise SystemExit(f"bad spec item {item}")
        out += [o.format(value) for o in SPEC_ITEMS[key]]
    return out


def tied_copy_drift(trainer: Trainer) -> float | None:
    """Largest |first-stage copy - last-stage copy| of the tied embedding (None if there is none)."""
    if not (trainer.pipelined and trainer.cfg.model.tie_embeddings):
        return None
    drift = torch.zeros((), dtype=torch.float64)
    for comm in trainer.engine.module.tied_comms.values():  # only ranks holding a copy have entries
        for weight in (p.detach() for p in comm["module"].parameters()):
            copies = [torch.empty_like(weight) for _ in comm["ranks"]]
            dist.all_gather(copies, weight, group=comm["group"])
            drift = torch.maximum(drift, (copies[0] - copies[-1]).abs().max().double())
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return drift.item()


def train_layout(cfg, resume_at: int, ckpt_dir: Path):
    trainer = Trainer(cfg)
    history = []
    if resume_at:
        history = [trainer.train_step() for _ in range(resume_at)]
        trainer.engine.save_checkpoint(str(ckpt_dir), tag="resume")
        trainer.close()
        trainer = Trainer(cfg)
        trainer.engine.load_checkpoint(str(ckpt_dir), tag="resume")
        trainer.step, trainer.train_data.consumed = resume_at, resume_at * cfg.train.global_batch_size
    summary = trainer.run()
    drift = tied_copy_drift(trainer)
    trainer.close()
    return history + summary.history, summary.val_losses, drift


def main():
    out_path, text, *specs = sys.argv[1:]
    world = discover().world_size
    results = {}
    for spec in specs:
        torch._dynamo.utils.counters.clear()  # what train.compile compiled for this spec alone
        cfg = resolve(load_config(None, TINY + [f"data.paths=[{text}]"] + overrides(spec)), world)
        resume_at = int(dict(item.partition("=")[::2] for item in spec.split(",")).get("resume", 0))
        ckpt_dir = Path(out_path).parent / f"checkpoint-{spec.replace(',', '_').replace('=', '')}"
        history, val_losses, drift = train_layout(cfg, resume_at, ckpt_dir)
        results[spec] = {
            "loss": [r.loss for r in history],
            "grad_norm": [r.grad_norm for r in history],
            "val_loss": [v for _, v in val_losses],
            "tied_drift": drift,
            "moe": [r.moe for r in history],
            "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        }
    if discover().rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
