"""``megadeep memory CONFIG [k=v ...] [--nproc N]``: train one step, then report per rank the bytes
really held by parameters, gradients and optimizer states next to the ZeRO paper's formula."""
from __future__ import annotations

import argparse
import json

from megadeep.errors import ConfigError
from megadeep.launch.args import add_launch_args, load_for_launch


def expected_states(run, pp_rank: int):
    """The planner's model-state prediction for one rank of a resolved run (``training.run``)."""
    from megadeep.planner.memory import rank_model_states

    return rank_model_states(run.cfg, run.zero_stage, run.persistence_threshold, pp_rank,
                             run.offload_optimizer)


def measure_point(cfg) -> int:
    """The micro-batch of step 2 after whose backward to measure. While gradients accumulate
    (micro-batch 0 of several) each ZeRO stage holds what the ZeRO paper counts: stage 0/1 the full
    gradient, stage 2/3 its partition. Without accumulation, the last (only) backward: DeepSpeed has
    then already reduced and, from stage 1 on, dropped the gradients this rank does not update."""
    return 0 if cfg.train.grad_accum_steps > 1 else cfg.train.grad_accum_steps - 1


def measure_run(cfg) -> list[dict]:
    """Every rank's measured bytes after the first optimizer step (gathered on all ranks)."""
    import torch.distributed as dist

    from megadeep.parallel import groups
    from megadeep.training.memory import measure_engine
    from megadeep.training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train_step()  # optimizer states exist from here on
        measured = []
        at = measure_point(cfg)
        trainer.train_step(after_backward=lambda micro: micro == at and measured.append(measure_engine(trainer.engine)))
        expected = expected_states(trainer.run_facts, groups.get_pipeline_model_parallel_rank())
        row = {"rank": dist.get_rank(), "adam": trainer.optimizer_name, **measured[0].as_dict(),
               "expected": {"params": expected.params, "grads": expected.grads, "optimizer": expected.optimizer}}
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        return rows
    finally:
        trainer.close()


def print_table(cfg, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    p = cfg.parallel
    mib = 1024**2
    table = Table(title=f"model states per rank in step 2, after backward of micro-batch {measure_point(cfg)}: {cfg.deepspeed.config}, {cfg.train.precision}, "
                        f"TP={p.tp} DP={p.dp} PP={p.pp}, {rows[0]['adam']}; MiB, formula in ()")
    for col in ("rank", "params", "grads", "optimizer", "model states", "formula", "Δ", "buffers"):
        table.add_column(col, justify="right")
    for r in rows:
        states = r["params"] + r["grads"] + r["optimizer"]
        formula = sum(r["expected"].values())
        cells = [f"{r[c] / mib:.2f} ({r['expected'][c] / mib:.2f})" for c in ("params", "grads", "optimizer")]
        table.add_row(str(r["rank"]), *cells, f"{states / mib:.2f}", f"{formula / mib:.2f}",
                      f"{(states - formula) / formula:+.1%}", f"{r['buffers'] / mib:.2f}")
    Console().print(table)


def cmd_memory(args: argparse.Namespace) -> int:
    if args.json:
        from megadeep.config.validate import check_writable_file

        check_writable_file(args.json, "--json")
    cfg, spawn = load_for_launch(args)
    if cfg.parallel.pp > 1:  # measuring happens between a micro-batch's backward and the step
        raise ConfigError("megadeep memory measures inside a training step, which DeepSpeed's pipeline engine "
                          "does not expose; measure with parallel.pp=1 (or estimate PP with `megadeep plan`)")
    if spawn:
        from megadeep.launch.local import run_local

        return run_local(cfg, spawn, "memory", ("--json", args.json) if args.json else ())
    import torch.distributed as dist

    rows = measure_run(cfg)
    if dist.get_rank() == 0:
        print_table(cfg, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


def add_memory(sub) -> None:
    p = sub.add_parser("memory", help="measure per-rank parameter/gradient/optimizer bytes after one step")
    add_launch_args(p)
    p.add_argument("--json", default="", help="also write every rank's numbers to this JSON file")
    p.set_defaults(func=cmd_memory)
