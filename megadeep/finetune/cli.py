"""``megadeep lora``: a LoRA run's adapters in PEFT's format, or merged into the base (offline, no processes)."""
from __future__ import annotations

import argparse

from megadeep.checkpoint.cli import _destination, _source


def cmd_export_peft(args: argparse.Namespace) -> int:
    _source(args.src, "src")
    _destination(args.out, "out")
    from megadeep.finetune.export import export_peft

    print(f"megadeep: wrote {export_peft(args.src, args.out, args.base_model)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    _source(args.src, "src")
    _destination(args.dst, "dst")
    from megadeep.finetune.export import merge_lora

    print(f"megadeep: wrote {merge_lora(args.src, args.dst)} (export it with `megadeep ckpt export-hf`)")
    return 0


def add_lora(sub) -> None:
    p = sub.add_parser("lora", help="export a LoRA run's adapters (PEFT format) or merge them into the base")
    cmds = p.add_subparsers(dest="lora_command", required=True)
    src_help = "a LoRA run's step_XXXXXXXX checkpoint, or its checkpoint dir (its 'latest')"
    c = cmds.add_parser("export-peft", help="write adapter_config.json + adapter_model.safetensors for peft")
    c.add_argument("src", help=src_help)
    c.add_argument("out", help="output folder")
    c.add_argument("--base-model", default="", help="base_model_name_or_path to record (e.g. the export-hf folder)")
    c.set_defaults(func=cmd_export_peft)
    c = cmds.add_parser("merge", help="fold the adapters into finetune.base: a TP=1 weights-only checkpoint")
    c.add_argument("src", help=src_help)
    c.add_argument("dst", help="checkpoint dir to write step_XXXXXXXX into")
    c.set_defaults(func=cmd_merge)
