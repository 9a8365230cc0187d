"""lm-eval with the ``megadeep`` model under torchrun (TP = the world size): writes rank 0's per-item
log-likelihoods of a task to argv[1]. argv: OUT.json CHECKPOINT TASK INCLUDE_PATH"""
import json
import sys

import lm_eval
import torch.distributed as dist
from lm_eval.tasks import TaskManager

import megadeep.inference.harness  # noqa: F401  registers "megadeep"

out, checkpoint, task, include = sys.argv[1:]
result = lm_eval.simple_evaluate(model="megadeep", model_args=f"checkpoint={checkpoint}", tasks=[task],
                                 task_manager=TaskManager(include_path=include), log_samples=True)
if dist.get_rank() == 0:
    resps = [r[0] for s in result["samples"][task] for r in s["resps"]]
    json.dump({"acc": result["results"][task]["acc,none"], "resps": resps, "tp": dist.get_world_size()}, open(out, "w"))
