"""``megadeep data train-tokenizer | preprocess | prepare``."""
from __future__ import annotations

import argparse
import json

SET_HELP = "preprocessing setting, e.g. --set quality.min_words=20 --set dedup.threshold=0.7 --set json_field=content"


def _settings(items: list[str]):
    from megadeep.config.load import settings_from_overrides
    from megadeep.data.preprocess import PreprocessSettings

    return settings_from_overrides(PreprocessSettings, items)


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from megadeep.data.preprocess import tokenizer_sample
    from megadeep.data.tokenizer import MODEL_TYPES, TokenizerSettings, train_tokenizer
    from megadeep.errors import DataError

    if args.model_type not in MODEL_TYPES:
        raise DataError(f"--model-type must be one of {', '.join(MODEL_TYPES)}")
    if args.vocab_size < 320:
        raise DataError(f"--vocab-size={args.vocab_size} is too small: 256 byte pieces, specials and the alphabet need ≥ 320")
    settings = TokenizerSettings(args.vocab_size, args.model_type, max_sentences=args.max_sentences)
    texts = tokenizer_sample(args.inputs, _settings(args.set), int(args.sample_mb * 1e6))
    info = train_tokenizer(texts, args.out, settings)
    print(f"{args.out}: {info['vocab_size']}-piece {args.model_type} tokenizer, sha256 {info['sha256'][:16]}…")
    return 0


def report(manifest: dict) -> str:
    s = manifest["stats"]
    lines = [f"documents in {s['documents_in']:>10,}   kept {s['documents_kept']:,}   "
             f"dropped {s['documents_in'] - s['documents_kept']:,}"]
    lines += [f"  dropped: {reason:<22} {n:>10,}" for reason, n in s["dropped"].items()]
    lines += [f"  PII replaced: {kind:<17} {n:>10,}" for kind, n in s["pii_replaced"].items()]
    lines.append(f"tokens {manifest['tokens']:,} in {len(manifest['shards'])} shard(s), {manifest['dtype']}; "
                 f"{s['bytes_in'] / 1e6:.1f} MB in {s['wall_seconds']:.1f} s on {s['workers']} worker(s), {manifest['tasks']} task(s) "
                 f"= {s['bytes_in'] / 1e6 / max(s['wall_seconds'], 1e-9):.2f} MB/s")
    return "\n".join(lines)


def cmd_preprocess(args: argparse.Namespace) -> int:
    from megadeep.data.preprocess import SlurmOptions, preprocess

    s = _settings(args.set)
    for key in ("workers", "tasks"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    if args.text_field is not None:
        s.json_field = args.text_field
    slurm = None
    if args.slurm:
        slurm = SlurmOptions(partition=args.partition or "", time=args.time, cpus_per_task=args.cpus_per_task,
                             max_parallel=args.max_parallel)
    result = preprocess(args.inputs, args.out, args.tokenizer, s, overwrite=args.overwrite, slurm=slurm)
    if slurm is not None:
        jobs = ", ".join(f"{k} {v}" for k, v in result["jobs"].items())
        print(f"submitted SLURM jobs (stage job-id; -1: already done): {jobs}")
        print(f"manifest: {args.out}/manifest.json once the last job finishes; rerun this command to resume")
        return 0
    print(report(result))
    print(f"manifest: {args.out}/manifest.json")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from megadeep.config import load_config
    from megadeep.config.validate import check_data
    from megadeep.data.prepare import prepare_data

    cfg = load_config(args.config, args.overrides)
    check_data(cfg)
    cfg = prepare_data(cfg)
    print(json.dumps({"data.paths": cfg.data.paths, "model.vocab_size": cfg.model.vocab_size}))
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="tokenizer training and data preprocessing")
    data = p.add_subparsers(dest="data_command", required=True)

    t = data.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on a sample of text or JSON-lines files")
    t.add_argument("inputs", nargs="+", help="text files (one document each), .jsonl files, directories or globs")
    t.add_argument("--out", required=True, help="directory for tokenizer.model and tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--model-type", default="bpe", help="bpe or unigram")
    t.add_argument("--sample-mb", type=float, default=1000.0, help="train on the first this many MB of clean documents")
    t.add_argument("--max-sentences", type=int, default=1_000_000, help="lines sampled from them")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    t.set_defaults(func=cmd_train_tokenizer)

    pre = data.add_parser("preprocess", help="clean, deduplicate, scrub and tokenise text into token shards")
    pre.add_argument("inputs", nargs="+", help="text files (one document each), .jsonl[.gz|.zst] or .parquet files, "
                     "directories or globs")
    pre.add_argument("--tokenizer", required=True, help="a SentencePiece tokenizer directory (or its tokenizer.model), or a Hugging Face "
                     "tokenizer folder (or its tokenizer.json)")
    pre.add_argument("--out", required=True, help="output directory: shards + manifest.json")
    pre.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    pre.add_argument("--tasks", type=int, default=None, help="tasks over the input files (default: one per file)")
    pre.add_argument("--text-field", default=None, help="JSON field / Parquet column holding the text (default: text)")
    pre.add_argument("--slurm", action="store_true", help="submit the stages as SLURM array jobs instead of running here")
    pre.add_argument("--partition", default=None, help="with --slurm: partition (default: the cluster's)")
    pre.add_argument("--time", default="24:00:00", help="with --slurm: time limit per array task")
    pre.add_argument("--cpus-per-task", type=int, default=1, help="with --slurm: CPUs per array task")
    pre.add_argument("--max-parallel", type=int, default=-1, help="with --slurm: array tasks running at once (-1: no limit)")
    pre.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    pre.set_defaults(func=cmd_preprocess)

    prep = data.add_parser("prepare", help="prepare a run config's data (a bundled corpus) before launching ranks")
    prep.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    prep.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    prep.set_defaults(func=cmd_prepare)
