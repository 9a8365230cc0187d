"""Train several DeepSpeed recipes in one launch; record per-step losses and the memory measured in
step 2 (as ``megadeep memory`` does) for each.

argv: OUT.json BASE.yaml SPEC [SPEC ...], SPEC = comma-separated dotted overrides, e.g.
"deepspeed.config=zero3_nvme,deepspeed.nvme_path=/tmp/x". Results are keyed by SPEC.
"""
import json
import sys

import torch.distributed as dist

from megadeep.config import load_config, resolve
from megadeep.launch.env import discover
from megadeep.parallel import groups
from megadeep.training.memory import measure_engine
from megadeep.training.memory_cli import expected_states, measure_point
from megadeep.training.trainer import Trainer


def run(cfg) -> dict:
    trainer = Trainer(cfg)
    try:
        losses, measured = [], []
        at = measure_point(cfg)
        for step in range(cfg.train.steps):
            hook = (lambda micro: micro == at and measured.append(measure_engine(trainer.engine))) if step == 1 else None
            losses.append(trainer.train_step(after_backward=hook).loss)
        expected = expected_states(trainer.run_facts, groups.get_pipeline_model_parallel_rank())
        largest = max(p.numel() * p.element_size() for p in trainer.engine.module.parameters())
        opt = trainer.engine.optimizer  # ZeRO-3: is the fp32 master the parameters' own flat partition?
        shared = [m.data_ptr() == q.data_ptr() for m, q in zip(
            getattr(opt, "fp32_partitioned_groups_flat", []), getattr(opt, "fp16_partitioned_groups_flat", []))]
        row = {**measured[0].as_dict(), "rank": dist.get_rank(), "largest_param_bytes": largest,
               "master_shares_params": bool(shared) and all(shared),
               "expected": {"params": expected.params, "grads": expected.grads, "optimizer": expected.optimizer}}
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        return {"loss": losses, "adam": trainer.optimizer_name, "memory": rows}
    finally:
        trainer.close()


def main():
    out_path, base, *specs = sys.argv[1:]
    world = discover().world_size
    results = {spec: run(resolve(load_config(base, spec.split(",")), world)) for spec in specs}
    if discover().rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
