"""``megadeep ckpt``: inspect, verify and convert checkpoints offline (no processes are started).

Arguments are checked before anything is read or written: a wrong one is one line and exit 2."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megadeep.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def _source(path: str, flag: str) -> None:
    if not Path(path).is_dir():
        raise ConfigError(f"{flag} '{path}' is not a directory (give a step_XXXXXXXX checkpoint or a checkpoint dir)")


def _destination(path: str, flag: str) -> None:
    from megadeep.config.validate import check_writable_dir

    check_writable_dir(path, flag)


def _tp(tp: int) -> None:
    if tp < 1:
        raise ConfigError(f"--tp must be ≥ 1, got {tp}")


def cmd_info(args: argparse.Namespace) -> int:
    _source(args.path, "path")
    from megadeep.checkpoint.convert import open_source

    ckpt = open_source(args.path)
    m = ckpt.meta
    summary = {"path": str(ckpt.path), "step": m["step"], "consumed_samples": m["consumed_samples"],
               "layout": m["layout"], "zero_stage": m.get("zero_stage"), "precision": m.get("precision"),
               "optimizer_state": m.get("optimizer") is not None, "params": len(m["params"]),
               "files": len(ckpt.files), "verified": True}
    print(json.dumps(summary, indent=1))
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    _source(args.src, "src")
    _tp(args.tp)
    if args.pp != 1:
        raise ConfigError("offline resharding writes pp=1 only (--pp 1); a pipeline run reshards on load")
    _destination(args.dst, "dst")
    from megadeep.checkpoint.convert import reshard

    print(f"megadeep: wrote {reshard(args.src, args.dst, args.tp, args.pp)}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    _source(args.src, "src")
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise ConfigError(f"--tokenizer '{args.tokenizer}' does not exist")
    _destination(args.out, "out")
    from megadeep.checkpoint.hf import export_hf

    print(f"megadeep: wrote {export_hf(args.src, args.out, args.dtype, args.tokenizer)}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    if not (Path(args.folder) / "config.json").is_file():
        raise ConfigError(f"folder '{args.folder}' has no config.json (not a Hugging Face model folder)")
    _tp(args.tp)
    _destination(args.dst, "dst")
    from megadeep.checkpoint.hf import import_hf

    print(f"megadeep: wrote {import_hf(args.folder, args.dst, args.tp)}")
    return 0


def add_ckpt(sub) -> None:
    p = sub.add_parser("ckpt", help="inspect and convert checkpoints (reshard, Hugging Face export/import)")
    cmds = p.add_subparsers(dest="ckpt_command", required=True)
    src_help = "a step_XXXXXXXX checkpoint, or a checkpoint dir (its 'latest')"

    c = cmds.add_parser("info", help="verify every file of a checkpoint and print what it holds")
    c.add_argument("path", help=src_help)
    c.set_defaults(func=cmd_info)

    c = cmds.add_parser("reshard", help="rewrite a checkpoint's files for another tensor-parallel size")
    c.add_argument("src", help=src_help)
    c.add_argument("dst", help="checkpoint dir to write step_XXXXXXXX (and latest) into")
    c.add_argument("--tp", type=int, required=True)
    c.add_argument("--pp", type=int, default=1)
    c.set_defaults(func=cmd_reshard)

    c = cmds.add_parser("export-hf", help="write a Hugging Face folder (Llama, Mistral or Qwen2, as the model came)")
    c.add_argument("src", help=src_help)
    c.add_argument("out", help="output folder (config.json, model.safetensors)")
    c.add_argument("--dtype", default="float32", choices=DTYPES)
    c.add_argument("--tokenizer", default=None, help="tokenizer to include: a SentencePiece model or a Hugging Face tokenizer folder (default: the run's data.tokenizer)")
    c.set_defaults(func=cmd_export_hf)

    c = cmds.add_parser("import-hf", help="make a weights-only checkpoint (and train.yaml) from a Hugging Face Llama/Mistral/Qwen2 folder")
    c.add_argument("folder", help="folder with config.json and model.safetensors")
    c.add_argument("dst", help="checkpoint dir to write step_00000000 into")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size to cut the files for (any layout loads it)")
    c.set_defaults(func=cmd_import_hf)
