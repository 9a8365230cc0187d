"""``megadeep`` command line. User errors print one line and exit 2; heavy imports wait until needed
so that a bad config is refused in about a second, before any process starts."""
from __future__ import annotations

import argparse
import sys

from megadeep.checkpoint.cli import add_ckpt
from megadeep.data.cli import add_data
from megadeep.errors import CheckpointError, ConfigError, RunAborted
from megadeep.finetune.cli import add_lora
from megadeep.inference.cli import add_eval, add_generate
from megadeep.launch.args import add_launch_args, load_for_launch
from megadeep.launch.cli import add_launch
from megadeep.launch.local import guard_rank
from megadeep.monitoring.plot import add_plot
from megadeep.planner.cli import add_plan
from megadeep.training.memory_cli import add_memory


def cmd_train(args: argparse.Namespace) -> int:
    from megadeep.training import preemption

    if args.dry_run:
        from megadeep.training.dry_run import cmd_dry_run

        return cmd_dry_run(args)
    preemption.install()  # again (python -m megadeep did already): for main() called in-process
    from megadeep.checkpoint.lock import holding
    from megadeep.launch.env import discover

    cfg, spawn = load_for_launch(args)
    with holding(cfg.checkpoint.dir, 0 if spawn else discover().rank):  # before any rank starts
        if spawn:
            from megadeep.launch.local import run_local

            return run_local(cfg, spawn)
        from megadeep.training.trainer import train

        return train(cfg).exit_code


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML run config")
    add_launch_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the run for --world-size ranks, build --rank's model on the meta device and "
                        "report its layout, memory and device; starts nothing, writes nothing")
    p.add_argument("--world-size", type=int, default=0, help="with --dry-run: the target world size")
    p.add_argument("--rank", type=int, default=0, help="with --dry-run: which rank to report (default 0)")
    p.add_argument("--gpu", default="H100-80", help="with --dry-run: the GPU whose memory the rank must fit "
                                                    "(A100-40, A100-80, H100-80)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="with --dry-run: GPUs per node")
    p.set_defaults(func=cmd_train)


COMMANDS = [add_train, add_data, add_memory, add_launch, add_plan, add_plot, add_ckpt, add_generate, add_eval, add_lora]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage first); ``--help`` still
    shows it. Subcommand parsers are of this class too (argparse makes them ``type(parent)``)."""

    def error(self, message: str):
        self.exit(2, f"megadeep: error: {self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    guard_rank()  # first: a rank whose launcher is already gone must not start training
    parser = Parser(prog="megadeep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after the options (argparse only takes them before)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"megadeep: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, RunAborted) as e:
        print(f"megadeep: error: {e}", file=sys.stderr)
        return 1
