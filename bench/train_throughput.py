"""Training tokens/s of megadeep's Trainer next to Hugging Face transformers, torchtitan and a plain-PyTorch
Llama (eager and under torch.compile), the bare megadeep model and megadeep with train.compile (vs the
compiled plain model), on one shape, fp32 on CPU.

Fair by construction: every implementation lives in its own long-lived process, built and warmed up
(>= 3 steps) before timing; rounds alternate between them (A, B, C, ..., A, B, C, ...), so a load swing
on a shared machine hits all of them alike; each reports the median step of its turn, and ratios are
medians of per-round ratios. Every side does the same work: the same token batch, fused AdamW with the
same hyper-parameters and decay groups, clipping by the global norm at 1.0 and megadeep's warmup+cosine
LR schedule. The load average is recorded with every sample, and each turn measures the matmul peak it
gets, so the step is also reported as % of that peak (model FLOPs, PaLM's count).

megadeep's Trainer (and the bare floor) keep freed host memory for the next step on CPU
(``training.host_memory``); the others run under glibc's defaults, as their users run them.
``--reuse-allocator-everywhere`` puts every implementation under megadeep's setting, to show what that
setting alone is worth.

    python -m bench.train_throughput [--quick] [--rounds N] [--reuse-allocator-everywhere]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The shape: ~60M parameters, vocab 32000 untied, dim 512, 8 layers, seq 256, micro-batch 4.
SHAPE = dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, ffn_dim=1536, seq_len=256, batch=4)
QUICK = dict(vocab_size=2048, dim=128, n_layers=2, n_heads=4, ffn_dim=384, seq_len=64, batch=2)
IMPLS = ("megadeep", "megadeep_bare", "hf_transformers", "torchtitan", "plain", "plain_compiled", "megadeep_compiled")
BASELINES = IMPLS[1:]
OPT = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CLIP, WARMUP, STEPS = 1.0, 10, 1000
WARMUP_STEPS = 3
MARK = "@@bench "
TORCHTITAN_PATH = os.environ.get("MEGADEEP_BENCH_TORCHTITAN", "")  # a `pip install --target` dir, if not in the venv


# --- the implementations (each runs in its own worker process) ---------------------------------------
def batch(s: dict):
    import torch

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, s["vocab_size"], (s["batch"], s["seq_len"] + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def torch_loop(model, loss_fn, s: dict):
    """fwd + bwd + clip + fused AdamW + LR schedule, as a training loop written by hand does it."""
    import torch

    from megadeep.training.optimizer import lr_lambda, param_groups

    opt = torch.optim.AdamW(param_groups(model, OPT["weight_decay"]), fused=True,
                            **{k: v for k, v in OPT.items() if k != "weight_decay"})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(STEPS, WARMUP, OPT["lr"], OPT["lr"] / 10))
    inputs, targets = batch(s)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = loss_fn(model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def ce(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def model_overrides(s: dict) -> list[str]:
    return [f"model.vocab_size={s['vocab_size']}", f"model.dim={s['dim']}", f"model.n_layers={s['n_layers']}",
            f"model.n_heads={s['n_heads']}", f"model.ffn_dim={s['ffn_dim']}", f"model.max_seq_len={s['seq_len']}",
            "model.tie_embeddings=false", "model.vocab_pad_unit=1"]


def build_megadeep(s: dict, workdir: Path, extra: tuple[str, ...] = ()):
    import itertools

    from megadeep.config import load_config, resolve
    from megadeep.training.trainer import Trainer

    text = workdir / "text.txt"
    text.write_bytes(bytes(range(256)) * 64)  # the loader wants data; the timed steps use batch(s) instead
    cfg = resolve(load_config(None, model_overrides(s) + [f"train.seq_len={s['seq_len']}",
        f"train.micro_batch_size={s['batch']}", f"train.global_batch_size={s['batch']}", f"train.steps={STEPS}",
        f"optim.lr={OPT['lr']}", f"optim.min_lr={OPT['lr'] / 10}", f"optim.warmup_steps={WARMUP}",
        f"optim.beta1={OPT['betas'][0]}", f"optim.beta2={OPT['betas'][1]}", f"optim.eps={OPT['eps']}",
        f"optim.weight_decay={OPT['weight_decay']}", f"optim.grad_clip={CLIP}",
        "deepspeed.config=zero0", "data.val_fraction=0", f"data.paths=[{text}]", "log.progress=false", *extra,
    ]), 1)
    trainer = Trainer(cfg)
    trainer.train_data = itertools.repeat(batch(s))
    print(f"megadeep optimizer: {trainer.optimizer_name}", file=sys.stderr, flush=True)
    return trainer.train_step, sum(p.numel() for p in trainer.engine.module.parameters())


def build_megadeep_compiled(s: dict, workdir: Path):
    """The Trainer with train.compile=true (each block under torch.compile), vs plain_compiled."""
    return build_megadeep(s, workdir, ("train.compile=true",))


def megadeep_model_config(s: dict):
    from megadeep.config import load_config

    return load_config(None, model_overrides(s)).model


def build_megadeep_bare(s: dict, workdir: Path):
    """megadeep's model alone (no DeepSpeed, no Trainer) in the hand-written loop: the floor. With the
    Trainer's host allocator on CPU (``training.host_memory``), so that the two differ by the Trainer."""
    from megadeep.model import Transformer
    from megadeep.training.host_memory import reuse_freed_memory

    reuse_freed_memory()

    model = Transformer(megadeep_model_config(s))
    model.init_weights(0)
    return torch_loop(model, lambda m, x, y: m(x, y), s)


def build_hf_transformers(s: dict, workdir: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["dim"], intermediate_size=s["ffn_dim"],
        num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"], num_key_value_heads=s["n_heads"],
        max_position_embeddings=s["seq_len"], tie_word_embeddings=False, attn_implementation="sdpa",
    ))
    model.train()
    return torch_loop(model, lambda m, x, y: ce(m(input_ids=x).logits, y), s)


def build_torchtitan(s: dict, workdir: Path):
    """torchtitan 0.3's Llama 3 model class in the same loop (its trainer assumes CUDA). Two 0.3.0
    quirks are worked around: its expert-parallel module imports triton kernels eagerly (stubbed: the
    dense model never calls them; a stub ``triton`` itself would break torch._dynamo), and its config
    checks refuse plain SDPA for language models, so the layers get its ``ScaledDotProductAttention``."""
    import types

    import torch

    if TORCHTITAN_PATH:
        sys.path.append(TORCHTITAN_PATH)
    stub = types.ModuleType("torchtitan.distributed.minimal_async_ep.kernels")
    stub.__getattr__ = lambda name: None
    sys.modules.setdefault(stub.__name__, stub)
    import torchtitan.models.llama3 as llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    llama3.get_attention_config = lambda backend: ScaledDotProductAttention.Config()
    d, v = s["dim"], s["vocab_size"]
    model = llama3.Llama3Model.Config(
        dim=d, vocab_size=v,
        tok_embeddings=Embedding.Config(num_embeddings=v, embedding_dim=d, param_init=llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=d, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=d, out_features=v, param_init=llama3._output_linear_init(d)),
        layers=llama3._build_llama3_layers(
            fuse_qkv=True, n_layers=s["n_layers"], dim=d, n_heads=s["n_heads"], hidden_dim=s["ffn_dim"],
            rope=ComplexRoPE.Config(dim=d // s["n_heads"], max_seq_len=s["seq_len"], theta=10000.0),
            attn_backend="sdpa",
        ),
    ).build()
    model.init_states(buffer_device=torch.device("cpu"))
    model.train()
    return torch_loop(model, lambda m, x, y: ce(m(x), y), s)


def plain_llama(s: dict):
    """A plain-PyTorch Llama in the style of nanoGPT: the reference a hand-written model sets."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, h, hd = s["dim"], s["n_heads"], s["dim"] // s["n_heads"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
            self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.w13, self.w2 = nn.Linear(d, 2 * s["ffn_dim"], bias=False), nn.Linear(s["ffn_dim"], d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.n1(x)).view(b, t, 3, h, hd).transpose(1, 3).unbind(2)
            rot = lambda u: u * cos + torch.cat([-u[..., hd // 2:], u[..., :hd // 2]], -1) * sin  # noqa: E731
            y = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
            x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
            gate, up = self.w13(self.n2(x)).chunk(2, -1)
            return x + self.w2(F.silu(gate) * up)

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(s["vocab_size"], d)
            self.blocks = nn.ModuleList(Block() for _ in range(s["n_layers"]))
            self.norm, self.head = nn.RMSNorm(d, eps=1e-5), nn.Linear(d, s["vocab_size"], bias=False)
            inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
            f = torch.outer(torch.arange(s["seq_len"]).float(), inv).repeat(1, 2)
            self.register_buffer("cos", f.cos(), persistent=False)
            self.register_buffer("sin", f.sin(), persistent=False)
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, tokens, targets):
            x = self.emb(tokens)
            for blk in self.blocks:
                x = blk(x, self.cos, self.sin)
            return ce(self.head(self.norm(x)), targets)

    return Llama()


def build_plain(s: dict, workdir: Path):
    return torch_loop(plain_llama(s), lambda m, x, y: m(x, y), s)


def build_plain_compiled(s: dict, workdir: Path):
    import torch

    model = plain_llama(s)
    compiled = torch.compile(model)
    step, n = torch_loop(model, lambda m, x, y: compiled(x, y), s)
    return step, n


def worker(name: str, shape: dict, reuse_all: bool) -> None:
    """Build ``name``, warm it up, then serve turns: read a step count, run and time them, answer.
    ``reuse_all``: every implementation under megadeep's host allocator (what it alone is worth)."""
    import torch

    from megadeep.monitoring.flops import measure_cpu_peak_flops
    from megadeep.training.host_memory import reuse_freed_memory

    if reuse_all:
        reuse_freed_memory()

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        step, params = globals()[f"build_{name}"](shape, Path(tmp))
        for _ in range(WARMUP_STEPS):
            step()
        print(MARK + json.dumps({"ready": True, "params": params, "threads": torch.get_num_threads()}), flush=True)
        for line in sys.stdin:
            times = []
            for _ in range(int(line)):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            print(MARK + json.dumps({"times": times, "load": os.getloadavg()[0], "peak": measure_cpu_peak_flops()}),
                  flush=True)


# --- the driver -----------------------------------------------------------------------------------------
class Worker:
    def __init__(self, name: str, shape: dict, timeout: float, reuse_all: bool):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.name, self.timeout = name, timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.train_throughput", "--worker", name, "--shape", json.dumps(shape)]
            + ["--reuse-allocator-everywhere"] * reuse_all,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def reply(self) -> dict:
        while line := self.proc.stdout.readline():  # libraries print too: answers carry a marker
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        err = self.proc.stderr.read()[-2000:]
        raise RuntimeError(f"{self.name} worker died: {err}")

    def turn(self, steps: int) -> dict:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def flops_per_step(s: dict) -> float:
    from megadeep.monitoring.flops import flops_per_token

    return flops_per_token(megadeep_model_config(s), s["seq_len"]) * s["batch"] * s["seq_len"]


def run(quick: bool = False, rounds: int | None = None, steps_per_turn: int | None = None,
        impls: tuple[str, ...] = IMPLS, reuse_all: bool = False) -> dict:
    s = QUICK if quick else SHAPE
    rounds = rounds or (2 if quick else 5)
    steps_per_turn = steps_per_turn or (3 if quick else 3)
    workers, params, threads, skipped = {}, {}, {}, {}
    for name in impls:  # built one at a time: each build and warm-up has the machine to itself
        w = Worker(name, s, timeout=1800, reuse_all=reuse_all)
        try:
            ready = w.reply()
            params[name], threads[name] = ready["params"], ready["threads"]
            workers[name] = w
        except RuntimeError as e:
            skipped[name] = str(e).strip().splitlines()[-1][:300]
    samples: dict[str, list[dict]] = {n: [] for n in workers}
    names = list(workers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            got = workers[name].turn(steps_per_turn)
            samples[name].append({"step_s": statistics.median(got["times"]), "times": got["times"],
                                  "load": got["load"], "peak_flops": got["peak"]})
    for w in workers.values():
        w.close()
    tokens, fps = s["batch"] * s["seq_len"], flops_per_step(s)
    per_impl = {}
    for name, rows in samples.items():
        per_impl[name] = {
            "params": params[name], "threads": threads[name],
            "tokens_per_s": tokens / statistics.median(r["step_s"] for r in rows),
            "pct_of_matmul_peak": 100 * statistics.median(fps / r["step_s"] / r["peak_flops"] for r in rows),
            "samples": rows,
        }
    def speedups(ours: str, names) -> dict[str, float]:
        return {name: statistics.median(b["step_s"] / a["step_s"] for a, b in zip(samples[ours], samples[name]))
                for name in names if ours in samples and name in samples and name != ours}

    return {"shape": s, "quick": quick, "reuse_allocator_everywhere": reuse_all, "rounds": rounds,
            "steps_per_turn": steps_per_turn, "warmup_steps": WARMUP_STEPS, "flops_per_step": fps, "impls": per_impl,
            "megadeep_speedup_vs": speedups("megadeep", samples),
            "megadeep_compiled_speedup_vs": speedups("megadeep_compiled", ("plain_compiled", "megadeep")),
            "skipped": skipped}


def headline(r: dict) -> list[dict]:
    from bench.common import row

    out = []
    for ours, key in (("megadeep", "megadeep_speedup_vs"), ("megadeep_compiled", "megadeep_compiled_speedup_vs")):
        md = r["impls"].get(ours)
        for name, ratio in r.get(key, {}).items():
            base = r["impls"][name]
            out.append(row(f"training tokens/s, fp32, {md['params'] / 1e6:.0f}M params, {ours} vs {name} "
                           f"(interleaved, median of per-round ratios; % matmul peak {md['pct_of_matmul_peak']:.0f} "
                           f"vs {base['pct_of_matmul_peak']:.0f})", md["tokens_per_s"], base["tokens_per_s"], ratio))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps-per-turn", type=int)
    ap.add_argument("--only", default="", help="comma-separated implementations (megadeep is always first)")
    ap.add_argument("--reuse-allocator-everywhere", action="store_true",
                    help="run every implementation under megadeep's CPU host allocator (training.host_memory)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.shape), args.reuse_allocator_everywhere)
    impls = tuple(dict.fromkeys(["megadeep", *[n for n in args.only.split(",") if n]])) if args.only else IMPLS
    r = run(args.quick, args.rounds, args.steps_per_turn, impls, args.reuse_allocator_everywhere)
    load = [x["load"] for rows in r["impls"].values() for x in rows["samples"]]
    print(f"{r['rounds']} rounds x {r['steps_per_turn']} steps, load average {min(load):.1f}-{max(load):.1f}")
    for name, v in r["impls"].items():
        ratio = r["megadeep_speedup_vs"].get(name)
        print(f"{name:>16}: {v['params'] / 1e6:6.1f}M params {v['tokens_per_s']:8.1f} tokens/s "
              f"{v['pct_of_matmul_peak']:5.1f}% of matmul peak"
              + (f"   megadeep/this {ratio:.3f}x" if ratio else ""))
    for name, ratio in r["megadeep_compiled_speedup_vs"].items():
        print(f"megadeep_compiled/{name} {ratio:.3f}x")
    for name, why in r["skipped"].items():
        print(f"{name:>16}: skipped: {why}")
    from bench.common import save

    print("saved", save("train_throughput" + ("-quick" if args.quick else "")
                        + ("-reuse-everywhere" if args.reuse_allocator_everywhere else ""), r))


if __name__ == "__main__":
    main()
