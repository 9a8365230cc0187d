"""Generation tokens/s with the KV cache against recomputing the whole sequence at every step
(``megadeep.inference.generate``, greedy, one process, fp32 CPU), on a batch of prompts of different
lengths; the two alternate in every repeat, medians.

    python -m bench.generation [--quick]
"""
from __future__ import annotations

import statistics
import sys

SHAPE = dict(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, max_seq_len=256,
             prompts=(16, 32, 48, 64), new_tokens=64)
QUICK = dict(vocab_size=2048, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=128,
             prompts=(8, 16, 24, 32), new_tokens=32)


def run(quick: bool = False, repeats: int | None = None) -> dict:
    import torch

    from megadeep.config.schema import ModelConfig
    from megadeep.inference.generate import Sampling, generate
    from megadeep.model import Transformer

    s = QUICK if quick else SHAPE
    repeats = repeats or (2 if quick else 3)
    cfg = ModelConfig(**{k: v for k, v in s.items() if k not in ("prompts", "new_tokens")})
    model = Transformer(cfg)
    model.init_weights(0)
    model.requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in s["prompts"]]
    runs: dict[str, list[dict]] = {"cache": [], "no_cache": []}
    tokens = {}
    for _ in range(repeats):
        for name, use_cache in (("cache", True), ("no_cache", False)):
            g = generate(model, prompts, Sampling(max_new_tokens=s["new_tokens"], use_cache=use_cache))
            runs[name].append({"tokens_per_s": g.tokens_per_s, "prefill_s": g.prefill_s, "decode_s": g.decode_s})
            tokens[name] = g.tokens
    med = {name: statistics.median(r["tokens_per_s"] for r in v) for name, v in runs.items()}
    return {"shape": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}, "repeats": repeats,
            "threads": torch.get_num_threads(), "tokens_per_s": med, "speedup": med["cache"] / med["no_cache"],
            "same_tokens": tokens["cache"] == tokens["no_cache"], "runs": runs}


def headline(r: dict) -> list[dict]:
    from bench.common import row

    t = r["tokens_per_s"]
    return [row(f"generation tokens/s, KV cache vs none ({len(r['shape']['prompts'])} prompts, "
                f"{r['shape']['new_tokens']} new tokens)", t["cache"], t["no_cache"], r["speedup"])]


if __name__ == "__main__":
    import json

    from bench.common import save

    result = run(quick="--quick" in sys.argv)
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "speedup", "same_tokens")}, indent=1))
    print("saved", save("generation" + ("-quick" if "--quick" in sys.argv else ""), result))
