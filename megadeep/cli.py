"""``megadeep`` command line. User errors print one line and exit 2; heavy imports wait until needed
so that a bad config is refused in about a second, before any process starts."""
from __future__ import annotations

import argparse
import sys

from megadeep.errors import ConfigError
from megadeep.launch.args import add_launch_args, load_for_launch
from megadeep.planner.cli import add_plan
from megadeep.training.memory_cli import add_memory


def cmd_train(args: argparse.Namespace) -> int:
    cfg, spawn = load_for_launch(args)
    if spawn:
        from megadeep.launch.local import run_local

        return run_local(cfg, spawn)
    from megadeep.training.trainer import train

    train(cfg)
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML run config")
    add_launch_args(p)
    p.set_defaults(func=cmd_train)


COMMANDS = [add_train, add_memory, add_plan]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megadeep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"megadeep: error: {e}", file=sys.stderr)
        return 2
