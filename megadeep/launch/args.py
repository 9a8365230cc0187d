"""Command-line arguments of the commands that run a config (``train``, ``memory``): the config,
its overrides and ``--nproc``, validated for the world size before any process starts."""
from __future__ import annotations

import argparse

from megadeep.errors import ConfigError


def load_for_launch(args: argparse.Namespace):
    """The config validated for its world size, and how many local processes to start for it
    (0: this process is the run, alone or as one rank started by torchrun/srun)."""
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
    return cfg, (args.nproc if args.nproc and args.nproc > 1 else 0)


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2 train.steps=50")
    p.add_argument("--nproc", type=int, default=None, help="start this many local processes (torchrun)")
