"""Document masking under context parallelism: a packed sample's logits, computed with CP (each rank its
zig-zag slice, Ulysses and all-gather-KV), equal each document run alone in one process.

argv: OUT.json. Run under torchrun with 4 ranks: layouts CP=2 (×DP=2) and CP=4, RoPE positions global or
restarted per document. Rank 0 writes {"cp=C,method=M,restart=R": relative error}.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megadeep.model import Transformer
from megadeep.model.attention import DocumentSpec
from megadeep.parallel import context, groups
from megadeep.parallel.layout import Layout
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: the test module holds the shared sample
from tests.test_document_mask import CFG, SEP, packed_sample  # noqa: E402


def main():
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # Ulysses communicates through deepspeed.comm
    torch.manual_seed(0)
    plain = Transformer(CFG)  # no groups yet: the single-process model
    plain.init_weights(0)
    docs = packed_sample([9, 17, 5, 21, 12])
    tokens = torch.cat(docs)[None]
    with torch.no_grad():
        alone = torch.cat([plain(d[None])[0] for d in docs])
    results = {}
    for cp in (2, 4):
        groups.initialize(Layout(cp=cp, dp=dist.get_world_size() // cp))
        for method in ("ulysses", "allgather"):
            for restart in (False, True):
                model = Transformer(CFG, documents=DocumentSpec(SEP, restart), cp_attention=method)
                model.load_state_dict(plain.state_dict())
                with torch.no_grad():
                    local = model(tokens)[0]  # this rank's positions
                parts = [torch.empty_like(local) for _ in range(cp)]
                dist.all_gather(parts, local.contiguous(), group=groups.get_context_parallel_group())
                packed = torch.empty_like(alone)
                packed[context.gathered_positions(tokens.shape[1], "cpu")] = torch.cat(parts)
                err = ((packed - alone).abs().max() / alone.abs().max()).item()
                results[f"cp={cp},method={method},restart={restart}"] = err
        groups.destroy()
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
