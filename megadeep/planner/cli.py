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
    if min(args.cp) < 1:
        raise ConfigError(f"--cp sizes must be ≥ 1, got {','.join(map(str, args.cp))}")
    if args.out:
        check_writable_dir(args.out, "--out")
    if args.nvme_path:
        check_writable_dir(args.nvme_path, "--nvme-path")


def print_plan(result, w, cluster, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from megadeep.model import num_params

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
        table.add_row(str(i), str(c.tp) + (f"×CP{c.cp}" if c.cp > 1 else ""), str(c.pp), str(c.dp), c.recipe, str(c.micro_batch), str(e.micro_batches),
                      "full" if c.recompute == "full" else "-", f"{e.memory / gib:.1f}", f"{e.step_s:.2f}",
                      f"{e.tflops_per_gpu:.0f}", f"{e.mfu:.0%}", f"{w.global_batch * w.seq / e.step_s:,.0f}")
    console.print(table)
    if result.ranked:
        console.print(breakdown_table(result.ranked[:BREAKDOWN_ROWS]))
    for reason, n in sorted(result.illegal.items(), key=lambda kv: -kv[1])[:5]:
        console.print(f"[dim]illegal ({n}): {reason}[/dim]")


BREAKDOWN_ROWS = 3
TIME_PARTS = (("compute", "compute"), ("recompute", "recomp"), ("bubble", "bubble"), ("tp_exposed", "TP"),
              ("pp_exposed", "PP"), ("dp_exposed", "DP"), ("optimizer", "optim"), ("offload", "offload"))
MEMORY_PARTS = (("model_states", "states"), ("activations", "acts"), ("buffers", "bufs"), ("reserved", "rsvd"))


def breakdown_table(ranked):
    """Why the best layouts rank where they do: predicted step seconds and GPU GiB by part."""
    from rich.table import Table

    table = Table(title="where the step time (s) and GPU memory (GiB) of the best layouts go "
                        "(TP/PP/DP: communication that does not overlap compute)")
    for col in ("#", *(name for _, name in TIME_PARTS), "step s", *(name for _, name in MEMORY_PARTS), "GPU GiB"):
        table.add_column(col, justify="right")
    for i, e in enumerate(ranked, 1):
        b = e.breakdown()
        t, mem = b["time_s"], b["memory_bytes"]
        table.add_row(str(i), *(f"{t[k]:.2f}" for k, _ in TIME_PARTS), f"{t['step']:.2f}",
                      *(f"{mem[k] / 1024**3:.1f}" for k, _ in MEMORY_PARTS), f"{mem['total'] / 1024**3:.1f}")
    return table


def plan_json(result, w, cluster, top: int, calibration: str) -> dict:
    from megadeep.model.accounting import flops_per_token, num_params

    return {"model": {"params": num_params(w.model), "flops_per_token": flops_per_token(w.model, w.seq)},
            "workload": {"seq": w.seq, "global_batch": w.global_batch, "precision": w.precision,
                         "partition_method": w.partition_method},
            "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "gpu": cluster.gpu.name,
                        "measured_collectives": dict(cluster.measured)},
            "calibration": calibration or None,
            "fits": len(result.ranked), "too_big": result.too_big, "illegal": result.illegal,
            "ranked": [e.breakdown() for e in result.ranked[:top]]}


def write_outputs(out_dir: Path, cfg, world: int) -> None:
    import yaml

    from megadeep.config import resolve, to_dict
    from megadeep.config.deepspeed import compose

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out_dir / "ds_config.json").write_text(json.dumps(compose(resolve(cfg, world, require_data=False)), indent=2) + "\n")


DEFAULT_CALIBRATION = "megadeep-calibration.json"


def load_calibration(args, w, cluster):
    """``--calibrate``: time this machine at the plan's shapes and save it to ``--calibration``;
    ``--calibration`` alone: reuse a saved one."""
    from megadeep.planner.calibrate import Calibration, calibrate
    from megadeep.planner.search import MICRO_BATCHES, divisors

    path = args.calibration or DEFAULT_CALIBRATION
    if args.calibrate:
        tps = [t for t in divisors(cluster.world_size) if t <= cluster.gpus_per_node]
        processes = max(1, min(cluster.gpus_per_node, args.calibrate_procs))
        cal = calibrate(w.model, w.seq, w.precision, tps, MICRO_BATCHES[:args.calibrate_micro], processes)
        cal.save(path)
        print(f"calibrated on {cal.device} ({cal.processes} processes): GEMMs up to {cal.peak / 1e12:.3g} TFLOP/s, "
              f"memory {cal.memory_rate / 1e9:.3g} GB/s; saved to {path}")
        return cal
    if args.calibration:
        if not Path(args.calibration).is_file():
            raise ConfigError(f"--calibration {args.calibration}: no such file (make one with --calibrate)")
        return Calibration.load(args.calibration)
    return None


def cmd_plan(args: argparse.Namespace) -> int:
    from megadeep.planner.estimate import Workload
    from megadeep.planner.search import RECIPES, plan, run_config

    check_args(args)
    cluster = cluster_from_args(args)
    base = base_config(args)
    if args.seq_len > base.model.max_seq_len:
        raise ConfigError(f"--seq-len {args.seq_len} is longer than model.max_seq_len={base.model.max_seq_len}")
    w = Workload(base.model, args.seq_len, args.global_batch, args.precision,
                 partition_method=base.parallel.partition_method)
    recipes = RECIPES + (("zero3_nvme",) if args.nvme_path else ())
    calibration = load_calibration(args, w, cluster)
    if calibration is not None:
        cluster = calibration.apply(cluster)
    result = plan(w, cluster, base, recipes, args.nvme_path, calibration, cp_sizes=args.cp)
    print_plan(result, w, cluster, args.top)
    if args.json:
        Path(args.json).write_text(json.dumps(plan_json(result, w, cluster, args.top, args.calibration), indent=1) + "\n")
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
    p.add_argument("--cp", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1,),
                   help="context-parallel sizes to consider, e.g. 1,2,4 (default 1: no CP)")
    p.add_argument("--top", type=int, default=10, help="rows to show")
    p.add_argument("--out", default="", help="write the best layout's run.yaml and ds_config.json here")
    p.add_argument("--json", default="", help="also write the ranking with each layout's time and memory breakdown here")
    p.add_argument("--calibrate", action="store_true",
                   help="time GEMMs, attention and collectives at this run's shapes on this machine and plan with them")
    p.add_argument("--calibration", default="", help=f"calibration file to write (--calibrate; default {DEFAULT_CALIBRATION}) or reuse")
    p.add_argument("--calibrate-procs", type=int, default=2, help="processes for the collective timings")
    p.add_argument("--calibrate-micro", type=int, default=2, help="how many of the smallest micro-batch sizes to time")
    p.set_defaults(func=cmd_plan)
