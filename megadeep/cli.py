"""``megadeep`` command line. User errors print one line and exit 2; heavy imports wait until needed
so that a bad config is refused in about a second, before any process starts."""
from __future__ import annotations

import argparse
import sys

from megadeep.data.cli import add_data
from megadeep.errors import ConfigError
from megadeep.launch.cli import add_launch
from megadeep.monitoring.plot import add_plot


def cmd_train(args: argparse.Namespace) -> int:
    from megadeep.training import preemption

    preemption.install()  # now: SIGUSR1's default action would kill a rank still loading torch
    from megadeep.config import load_config, resolve
    from megadeep.launch.env import world_size_from_env

    cfg = load_config(args.config, args.overrides)
    launched = world_size_from_env()
    if args.nproc is not None and launched is not None:
        raise ConfigError(f"--nproc starts processes itself, but this one was already started as one of "
                          f"{launched} ranks; drop --nproc under torchrun/srun")
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be ≥ 1, got {args.nproc}")
    cfg = resolve(cfg, args.nproc or launched or 1)
    from megadeep.data.prepare import prepare_data

    cfg = prepare_data(cfg, build=launched is None)  # the launcher prepares data; ranks only check it
    if args.nproc and args.nproc > 1:
        from megadeep.launch.local import run_local

        return run_local(cfg, args.nproc)
    from megadeep.launch.slurm import REQUEUE_EXIT
    from megadeep.training.trainer import train

    return REQUEUE_EXIT if train(cfg).preempted else 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML run config")
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2 train.steps=50")
    p.add_argument("--nproc", type=int, default=None, help="start this many local processes (torchrun)")
    p.set_defaults(func=cmd_train)


COMMANDS = [add_train, add_data, add_launch, add_plot]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megadeep", description=__doc__)
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
