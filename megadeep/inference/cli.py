"""``megadeep generate`` and ``megadeep eval``: a checkpoint of any layout, run at the layout asked for.

Arguments, prompts and the checkpoint's description are checked in the launching process, before any
rank starts: a problem is one line and exit 2. ``--nproc N`` starts N local ranks (torchrun); under
torchrun/srun already, this process is one rank. ``generate`` runs TP = the world size; ``eval``
runs ``--tp`` (default 1) × the rest as DP.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from megadeep.errors import ConfigError


def _meta(path: str) -> dict:
    """The checkpoint's meta.json, cheaply (files are hash-checked when the ranks load them)."""
    from megadeep.checkpoint import store
    from megadeep.errors import CheckpointError

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"checkpoint '{path}' is not a directory (give a step_XXXXXXXX checkpoint or a checkpoint dir)")
    try:
        return store.Checkpoint.open(p if store.is_checkpoint(p) else (store.latest(p) or p)).meta
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def read_prompts(path: str) -> list[str]:
    """``{"prompt": TEXT}`` per line; a malformed line is an error naming it (nothing is generated)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts '{path}' is not a file")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--prompts {path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ConfigError(f"--prompts {path}:{n}: want an object with a non-empty string 'prompt'")
        prompts.append(row["prompt"])
    if not prompts:
        raise ConfigError(f"--prompts {path}: holds no prompts")
    return prompts


def _launched(args) -> bool:
    """True in a rank (started by torchrun/srun); checks --nproc."""
    from megadeep.launch.env import world_size_from_env

    launched = world_size_from_env() is not None
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be ≥ 1, got {args.nproc}")
    if args.nproc is not None and launched:
        raise ConfigError("--nproc starts processes itself; drop it under torchrun/srun")
    return launched


def start_rank():
    """torch.distributed (or a single process) and this rank's device."""
    from megadeep.launch.env import bind_device, discover, init_distributed

    pe = discover()
    device = bind_device(pe, "auto")
    init_distributed(pe, device, 600)
    return device


def _sampling(args):
    from megadeep.inference.generate import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)


def cmd_generate(args: argparse.Namespace) -> int:
    from megadeep.inference.text import codec_for

    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompts FILE.jsonl")
    launched = _launched(args)
    meta = _meta(args.checkpoint)
    s = _sampling(args)
    s.check()
    codec = codec_for(meta["config"], args.tokenizer)
    s.eos_id = None if args.ignore_eos else codec.eos_id
    texts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    ids = [codec.encode(t) for t in texts]
    limit = int(meta["config"]["model"]["max_seq_len"])
    for n, p in enumerate(ids, 1):
        if not p:
            raise ConfigError(f"prompt {n} encodes to no tokens")
        if len(p) + s.max_new_tokens > limit:
            raise ConfigError(f"prompt {n} has {len(p)} tokens; with --max-new-tokens {s.max_new_tokens} that "
                              f"exceeds the model's context of {limit} tokens (nothing is truncated silently)")
    if args.out:
        from megadeep.config.validate import check_writable_file

        check_writable_file(args.out, "--out")
    if not launched and (args.nproc or 1) > 1:
        from megadeep.config.load import typed
        from megadeep.config.schema import ModelConfig
        from megadeep.launch.local import run_ranks

        m = typed(ModelConfig, meta["config"]["model"], "model")
        if m.n_heads % args.nproc or m.kv_heads % args.nproc or m.hidden_ffn % args.nproc:
            raise ConfigError(f"--nproc {args.nproc} (the tensor-parallel size) does not divide the model's heads "
                              f"({m.n_heads}), kv-heads ({m.kv_heads}) and FFN width ({m.hidden_ffn})")
        return run_ranks(args.nproc, ["generate", *_rank_argv(args)])
    return _generate_rank(args, s, codec, texts, ids)


def _rank_argv(args) -> list[str]:
    argv = [args.checkpoint, "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
            "--top-k", str(args.top_k), "--top-p", str(args.top_p), "--seed", str(args.seed)]
    argv += ["--prompt", args.prompt] if args.prompt is not None else ["--prompts", args.prompts]
    for flag, value in (("--tokenizer", args.tokenizer), ("--out", args.out)):
        argv += [flag, value] if value else []
    return argv + [f for f, on in (("--no-cache", args.no_cache), ("--ignore-eos", args.ignore_eos)) if on]


def _generate_rank(args, s, codec, texts: list[str], ids: list[list[int]]) -> int:
    import torch.distributed as dist

    from megadeep.inference.generate import generate
    from megadeep.inference.load import load_model
    from megadeep.parallel import groups
    from megadeep.parallel.layout import Layout

    device = start_rank()
    groups.initialize(Layout(tp=dist.get_world_size()))
    try:
        model, _ = load_model(args.checkpoint, device)
        first = dist.get_rank() == 0
        streamed: list[int] = []

        def stream(nxt):  # one prompt: print text as it comes
            streamed.append(int(nxt[0]))
            print(codec.decode(streamed)[len(codec.decode(streamed[:-1])):], end="", flush=True)

        g = generate(model, ids, s, on_token=stream if first and len(ids) == 1 else None)
        if first:
            if len(ids) == 1:
                print(flush=True)
            else:
                for text, new in zip(texts, g.tokens):
                    print(json.dumps({"prompt": text, "completion": codec.decode(new)}), flush=True)
            if args.out:
                rows = [{"prompt": t, "prompt_tokens": p, "tokens": new, "completion": codec.decode(new)}
                        for t, p, new in zip(texts, ids, g.tokens)]
                Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"megadeep: {g.new_tokens} tokens for {len(ids)} prompt(s) at TP={dist.get_world_size()} in "
                  f"{g.prefill_s + g.decode_s:.2f} s ({g.tokens_per_s:.1f} tokens/s; prefill {g.prefill_s:.3f} s, "
                  f"KV cache {'on' if s.use_cache else 'off'})", file=sys.stderr, flush=True)
    finally:
        groups.destroy()
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (any layout; --nproc N: TP=N)")
    p.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint, or a checkpoint dir (its 'latest')")
    p.add_argument("--prompt", default=None, help="one prompt (its text streams to stdout)")
    p.add_argument("--prompts", default=None, help="JSON lines of {\"prompt\": TEXT}; prints one JSON line each")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to start: tensor-parallel size")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed, the same text)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's data.tokenizer)")
    p.add_argument("--out", default=None, help="also write JSON lines with token ids here")
    p.set_defaults(func=cmd_generate)


def cmd_eval(args: argparse.Namespace) -> int:
    from megadeep.config import from_dict, resolve
    from megadeep.config.load import _apply_overrides
    from megadeep.data.loader import build_split
    from megadeep.inference.evaluate import eval_batches

    launched = _launched(args)
    if args.tp < 1:
        raise ConfigError(f"--tp must be ≥ 1, got {args.tp}")
    meta = _meta(args.checkpoint)
    # the layout asked for, no pipeline, and nothing of the training run's to write
    overrides = [*args.overrides, f"parallel.tp={args.tp}", "parallel.pp=1", "parallel.dp=0", "train.grad_accum_steps=0",
                 "parallel.sequence_parallel=false", "checkpoint.dir=", "checkpoint.resume=none", "log.metrics_file="]
    iters = None if args.iters < 0 else args.iters
    configs = []
    for data in args.data or [None]:
        extra = [f"data.paths=[{data}]", "data.weights=[]"] if data else []
        cfg = from_dict(_apply_overrides(copy.deepcopy(meta["config"]), overrides + extra))
        if not launched:  # checked here, before any rank starts
            cfg = resolve(cfg, args.nproc or 1)
            split = build_split(cfg)
            if split.val is None:
                raise ConfigError(f"{data or 'the run'}: no validation split (data.val_fraction={cfg.data.val_fraction})")
            eval_batches(len(split.val), cfg, iters)
        configs.append((data or "validation split", cfg))
    if not launched and (args.nproc or 1) > 1:
        from megadeep.launch.local import run_ranks

        argv = [args.checkpoint, "--tp", str(args.tp), "--iters", str(args.iters)]
        for d in args.data or []:
            argv += ["--data", d]
        return run_ranks(args.nproc, ["eval", *argv, *args.overrides])
    import torch.distributed as dist

    from megadeep.inference.evaluate import evaluate_loss, perplexity
    from megadeep.inference.load import load_model
    from megadeep.parallel import groups
    from megadeep.parallel.layout import Layout

    device = start_rank()
    configs = [(name, resolve(cfg, dist.get_world_size())) for name, cfg in configs]
    p = configs[0][1].parallel
    groups.initialize(Layout(tp=p.tp, dp=p.dp))
    results = []
    try:
        model, _ = load_model(args.checkpoint, device)
        for name, cfg in configs:
            start = time.perf_counter()
            loss = evaluate_loss(model, build_split(cfg).val, cfg, device, iters)
            results.append({"data": name, "loss": loss, "perplexity": perplexity(loss),
                            "layout": {"tp": p.tp, "dp": p.dp}, "seconds": round(time.perf_counter() - start, 3)})
    finally:
        groups.destroy()
    if dist.get_rank() == 0:
        for r in results:
            print(json.dumps(r), flush=True)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss / perplexity of a checkpoint on validation data (any layout)")
    p.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint, or a checkpoint dir (its 'latest')")
    p.add_argument("overrides", nargs="*", help="key=value settings over the checkpoint's run config")
    p.add_argument("--data", action="append", default=None,
                   help="a prepared dataset (or text file for data.source=bytes) whose held-out split to "
                        "evaluate; repeatable (default: the run's own validation split)")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to start")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (DP is what is left)")
    p.add_argument("--iters", type=int, default=-1,
                   help="global batches to evaluate (default: the run's train.eval_iters, as the trainer; "
                        "0: all the split holds)")
    p.set_defaults(func=cmd_eval)
