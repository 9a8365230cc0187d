"""Train LoRA layouts in one launch from the same base checkpoint; record losses, whether every frozen
base weight is bitwise the base checkpoint's after training, and the optimizer-state bytes per rank.
The adapters are saved by the trainer into OUT_DIR/<spec>/ (checkpoint.dir).

argv: OUT.json TEXT_FILE BASE_CKPT EXTRA_OVERRIDES(comma-separated or '-') SPEC [SPEC ...], SPEC = "tp=2,zero=3".
"""
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from megadeep.checkpoint.convert import open_source
from megadeep.checkpoint.engine_state import EngineState
from megadeep.checkpoint.tensors import MOMENTS, TensorReader
from megadeep.config import load_config, resolve
from megadeep.launch.env import discover
from megadeep.parallel import groups
from megadeep.training.trainer import Trainer

TINY = [
    "model.vocab_size=256", "model.dim=64", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4",
    "model.ffn_dim=128", "model.max_seq_len=32", "train.seq_len=32", "train.micro_batch_size=2",
    "train.global_batch_size=8", "train.steps=10", "optim.lr=0.01", "optim.min_lr=0.001",
    "optim.warmup_steps=2", "log.progress=false", "finetune.lora.rank=4", "finetune.lora.alpha=8",
]


def frozen_unchanged(trainer: Trainer, base) -> bool:
    reader = TensorReader(base)
    tp, r = groups.get_tensor_model_parallel_world_size(), groups.get_tensor_model_parallel_rank()
    padded = trainer.cfg.model.padded_vocab(tp)
    same = True
    for name, p in trainer.engine.module.named_parameters():
        if p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_tensor") else torch.no_grad():
            same &= p.grad is None and torch.equal(p.detach().cpu(), reader.piece("model", name, r, tp, padded))
    flag = torch.tensor([int(same)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def optimizer_bytes(trainer: Trainer) -> int:
    """fp32 master weights and Adam moments this rank holds, the most over ranks."""
    state = EngineState(trainer.engine)
    n = 0
    for m in state.master_tensors():
        n += m.numel() * m.element_size()
        for kind in MOMENTS:
            t = state.base.state.get(m, {}).get(kind)
            n += 0 if t is None else t.numel() * t.element_size()
    total = torch.tensor([n])
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def main():
    out, text, base_path, extra, *specs = sys.argv[1:]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    world = discover().world_size
    base = open_source(Path(base_path))
    results = {}
    for spec in specs:
        items = dict(kv.split("=") for kv in spec.split(","))
        overrides = [*TINY, f"parallel.tp={items['tp']}", f"deepspeed.config=zero{items['zero']}",
                     f"data.paths=[{text}]", f"finetune.base={base_path}",
                     f"checkpoint.dir={Path(out).parent / spec.replace(',', '_').replace('=', '')}"]
        overrides += [] if extra == "-" else extra.split(",")
        trainer = Trainer(resolve(load_config(None, overrides), world))
        try:
            summary = trainer.run()
            local = lambda trainable: sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # noqa: E731
                                          for p in trainer.engine.module.parameters() if p.requires_grad == trainable)
            results[spec] = {"loss": [r.loss for r in summary.history], "base_unchanged": frozen_unchanged(trainer, base),
                             "optimizer_bytes": optimizer_bytes(trainer), "adapter_params_tp": local(True),
                             "base_params_tp": local(False), "dp": groups.get_data_parallel_world_size()}
        finally:
            trainer.close()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
