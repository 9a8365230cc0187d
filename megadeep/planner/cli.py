"""``megadeep plan``: rank the layouts of a model on a cluster and write the best one's configs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megadeep.errors import ConfigError


def cluster_from_args(args):
    from megadeep.planner.hardware import GPUS, Cluster

    gpu = GPUS[args.gpu]
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be at least 1")
    for flag, value in (("--intra-gbps", args.intra_gbps), ("--inter-gbps", args.inter_gbps)):
        if not (0 <= value < float("inf")):
            raise ConfigError(f"{flag} must be ≥ 0 (0: the GPU's default), got {value}")
    intra = args.intra_gbps * 1e9 if args.intra_gbps else gpu.nvlink
    inter = args.inter_gbps * 1e9 if args.inter_gbps else gpu.network
    if not (0 < args.host_gib < float("inf")):
        raise ConfigError(f"--host-gib must be positive, got {args.host_gib}")
    return Cluster(args.nodes, args.gpus_per_node, gpu, intra, inter, args.host_gib * 1024**3)


def base_config(args):
    from megadeep.config import RunConfig, load_config
    from megadeep.planner.search import PRESETS

    if args.model and args.size:
        raise ConfigError("give either --model CONFIG.yaml or --size, not both")
    if args.size:
        if args.size not in PRESETS:
            raise ConfigError(f"--size {args.size} is not a preset; choose one of {', '.join(PRESETS)}")
        cfg = RunConfig()
        cfg.model = PRESETS[args.size]
        return cfg
    if not args.model:
        raise ConfigError("give the model: --model CONFIG.yaml (its model section) or --size (e.g. 7B)")
    from megadeep.config.validate import check_model_alone

    cfg = load_config(args.model)
    check_model_alone(cfg)
    return cfg


def check_args(args) -> None:
    """The numbers and paths of ``megadeep plan`` (the cluster's are checked by cluster_from_args)."""
    from megadeep.config.validate import check_writable_dir

    for flag, value in (("--seq-len", args.seq_len), ("--global-batch", args.global_batch), ("--top", args.top)):
        if value < 1:
            raise ConfigError(f"{flag} must be ≥ 1, got {value}")
    if args.out:
        check_writable_dir(args.out, "--out")
    if args.nvme_path:
        check_writable_dir(args.nvme_path, "--nvme-path")


def print_plan(result, w, cluster, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from megadeep.model import num_params
    from megadeep.planner.estimate import RESERVED

    gib = 1024**3
    console = Console(width=max(Console().width, 120))
    table = Table(title=f"{num_params(w.model) / 1e9:.2f}B params, seq {w.seq}, global batch {w.global_batch}, "
                        f"{w.precision} on {cluster.nodes}×{cluster.gpus_per_node} {cluster.gpu.name}: "
                        f"{len(result.ranked)} layouts fit, {result.too_big} too big, "
                        f"{sum(result.illegal.values())} illegal")
    for col in ("#", "TP", "PP", "DP", "recipe", "micro", "accum", "ckpt", "GPU GiB", "step s", "TFLOP/s/GPU",
                "MFU", "tokens/s"):
        table.add_column(col, justify="right")
    for i, e in enumerate(result.ranked[:top], 1):
        c = e.candidate
        table.add_row(str(i), str(c.tp), str(c.pp), str(c.dp), c.recipe, str(c.micro_batch), str(e.micro_batches),
                      "full" if c.recompute == "full" else "-", f"{e.memory / gib:.1f}", f"{e.step_s:.2f}",
                      f"{e.tflops_per_gpu:.0f}", f"{e.mfu:.0%}", f"{w.global_batch * w.seq / e.step_s:,.0f}")
    console.print(table)
    if result.ranked:
        e = result.ranked[0]
        console.print(f"#1 per GPU: {e.states / gib:.1f} GiB model states + {e.activations / gib:.1f} activations + "
                      f"{e.buffers / gib:.1f} buffers + {RESERVED / gib:.1f} reserved; {e.host / gib:.1f} GiB host. Step "
                      f"{e.step_s:.2f} s = compute {e.compute_s:.2f} + bubble {e.bubble_s:.2f} + TP {e.tp_s:.2f} + "
                      f"PP {e.pp_s:.2f} + DP {e.dp_s:.2f} + offload {e.offload_s:.2f}")
    for reason, n in sorted(result.illegal.items(), key=lambda kv: -kv[1])[:5]:
        console.print(f"[dim]illegal ({n}): {reason}[/dim]")


def write_outputs(out_dir: Path, cfg, world: int) -> None:
    import yaml

    from megadeep.config import resolve, to_dict
    from megadeep.config.deepspeed import compose

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out_dir / "ds_config.json").write_text(json.dumps(compose(resolve(cfg, world, require_data=False)), indent=2) + "\n")


def cmd_plan(args: argparse.Namespace) -> int:
    from megadeep.planner.estimate import Workload
    from megadeep.planner.search import RECIPES, plan, run_config

    check_args(args)
    cluster = cluster_from_args(args)
    base = base_config(args)
    if args.seq_len > base.model.max_seq_len:
        raise ConfigError(f"--seq-len {args.seq_len} is longer than model.max_seq_len={base.model.max_seq_len}")
    w = Workload(base.model, args.seq_len, args.global_batch, args.precision)
    recipes = RECIPES + (("zero3_nvme",) if args.nvme_path else ())
    result = plan(w, cluster, base, recipes, args.nvme_path)
    print_plan(result, w, cluster, args.top)
    if not result.ranked:
        raise ConfigError("no layout fits in GPU (and host) memory: use more GPUs or GPUs with more memory, "
                          "a smaller model or sequence, or NVMe offload (--nvme-path)")
    if args.out:
        best = run_config(base, w, result.ranked[0].candidate, args.nvme_path)
        write_outputs(Path(args.out), best, cluster.world_size)
        todo = "" if best.data.paths or best.data.corpus else "; name the training data (data.paths or data.corpus) before training"
        print(f"wrote {args.out}/run.yaml and {args.out}/ds_config.json for layout #1{todo}")
    return 0


def add_plan(sub) -> None:
    from megadeep.planner.hardware import GPUS

    p = sub.add_parser("plan", help="rank parallel layouts and ZeRO recipes for a model on a cluster")
    p.add_argument("--model", help="YAML run config whose model (and other sections) to plan for")
    p.add_argument("--size", help="a preset model instead: 125M, 1B, 7B, 13B, 70B, gpt3-175B")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(GPUS), default="A100-80")
    p.add_argument("--intra-gbps", type=float, default=0, help="GB/s per GPU inside a node (default: NVLink of the GPU)")
    p.add_argument("--inter-gbps", type=float, default=0, help="GB/s per node across nodes (default: 8 NICs)")
    p.add_argument("--host-gib", type=float, default=1024, help="CPU memory per node for offloaded states")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--nvme-path", default="", help="also consider ZeRO-3 offload to NVMe at this path")
    p.add_argument("--top", type=int, default=10, help="rows to show")
    p.add_argument("--out", default="", help="write the best layout's run.yaml and ds_config.json here")
    p.set_defaults(func=cmd_plan)
