"""Logits of imported HF checkpoints at TP = world size, with and without sequence parallel.

argv: OUT.json CASE_DIR [CASE_DIR ...]; each CASE_DIR holds ``ckpt`` (a step dir written for this TP),
``tokens.pt`` and ``ref.pt`` (transformers' logits). Writes {case/sp: max relative error over ranks}.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megadeep.checkpoint.store import Checkpoint
from megadeep.model import Transformer
from megadeep.parallel import groups
from megadeep.parallel.layout import Layout
from tests.hf_models import load_weights

dist.init_process_group("gloo")
W, R = dist.get_world_size(), dist.get_rank()
groups.initialize(Layout(tp=W))
errors = {}
for case in map(Path, sys.argv[2:]):
    step = next((case / "ckpt").glob("step_*"))
    cfg = Checkpoint.open(step).model_config
    tokens, ref = torch.load(case / "tokens.pt"), torch.load(case / "ref.pt")
    for sp in (False, True):
        model = Transformer(cfg, sequence_parallel=sp).eval()
        load_weights(model, step, R, W)
        with torch.no_grad():
            local = model(tokens)  # [batch, seq, padded_vocab / TP]
        parts = [torch.empty_like(local) for _ in range(W)]
        dist.all_gather(parts, local)
        logits = torch.cat(parts, dim=-1)[..., : cfg.vocab_size]
        e = torch.tensor(((logits.double() - ref.double()).abs().max() / ref.double().abs().max()).item())
        dist.all_reduce(e, op=dist.ReduceOp.MAX)
        errors[f"{case.name}/{'sp' if sp else 'tp'}"] = e.item()
if R == 0:
    Path(sys.argv[1]).write_text(json.dumps(errors))
dist.destroy_process_group()
