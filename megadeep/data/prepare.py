"""Make a run config's token data ready before any rank starts, and take the model's vocabulary from it.

For ``data.source=tokens`` with a bundled ``data.corpus``, the corpus is turned into a dataset once
(tokenizer trained, text preprocessed) in ``data.cache_dir/<corpus>-<key>``, where the key hashes the
corpus files and every setting that changes the result; later runs reuse it. The launcher does this
work (``megadeep train`` before it spawns ranks, or ``megadeep data prepare`` before ``srun``); a rank
never builds data while the others wait: under torchrun/srun, a missing cache is an error.

``model.vocab_size`` then comes from the tokenizer the data was made with (0 in the config), or must
equal it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from megadeep.config.load import settings_from_overrides
from megadeep.config.schema import DataConfig, RunConfig
from megadeep.data.corpora import corpus
from megadeep.data.shards import FORMAT, MANIFEST, check_manifests
from megadeep.data.tokenizer import TokenizerSettings, sha256_file
from megadeep.errors import ConfigError, DataError

# the modules whose code decides what a prepared corpus holds: a change to them rebuilds the cache
_PIPELINE_CODE = ("reader", "cleaning", "dedup", "pii", "tokenizer", "preprocess", "steps", "shards")


def _corpus_settings(d: DataConfig):
    from megadeep.data.preprocess import PreprocessSettings  # imports datatrove: only when needed

    return (settings_from_overrides(PreprocessSettings, list(corpus(d.corpus).preprocess)),
            TokenizerSettings(vocab_size=d.tokenizer_vocab))


def corpus_cache_dir(d: DataConfig) -> Path:
    """Where ``data.corpus`` is prepared: the key covers the files' content and every setting."""
    files = corpus(d.corpus).files()
    pre, tok = _corpus_settings(d)
    settings = pre.result_settings()
    code = [sha256_file(Path(__file__).parent / f"{m}.py") for m in _PIPELINE_CODE]
    key = {"format": FORMAT, "code": code, "files": [(Path(f).name, sha256_file(f)) for f in files], "preprocess": settings,
           "tokenizer": sha256_file(d.tokenizer) if d.tokenizer else asdict(tok)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(d.cache_dir).resolve() / f"{d.corpus}-{digest}"


def build_corpus(d: DataConfig, out: Path, log: Callable[[str], None]) -> None:
    """Tokenizer + preprocessing of ``data.corpus`` into ``out``, built aside and renamed into place."""
    from megadeep.data.preprocess import preprocess, tokenizer_sample
    from megadeep.data.tokenizer import train_tokenizer

    files = corpus(d.corpus).files()
    pre, tok_settings = _corpus_settings(d)
    start = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = d.tokenizer
        if not tokenizer:
            info = train_tokenizer(tokenizer_sample(files, pre, 1 << 30), tmp / "tokenizer", tok_settings)
            tokenizer = str(tmp / "tokenizer")
            log(f"megadeep: trained a {info['vocab_size']}-piece {tok_settings.model_type} tokenizer on "
                f"data.corpus={d.corpus} ({time.perf_counter() - start:.1f} s)")
        m = preprocess(files, tmp / "data", tokenizer, pre)
        s = m["stats"]
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "none"
        log(f"megadeep: preprocessed {s['documents_in']} documents ({s['bytes_in'] / 1e6:.1f} MB): "
            f"{s['documents_kept']} kept, dropped: {dropped}; {m['tokens']:,} tokens "
            f"({time.perf_counter() - start:.1f} s in all)")
        try:
            os.rename(tmp / "data", out)
        except OSError:
            if not (out / MANIFEST).is_file():  # not a concurrent launcher that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_data(cfg: RunConfig, build: bool = True, log: Callable[[str], None] = print) -> RunConfig:
    """``cfg`` with ``data.paths`` pointing at ready datasets and ``model.vocab_size`` from their tokenizer.

    ``build=False`` (a rank under torchrun/srun) refuses to build a missing corpus cache.
    """
    d = cfg.data
    if d.source != "tokens":
        return cfg
    out = copy.deepcopy(cfg)
    if d.format == "chat":  # JSON lines tokenised when the run reads them (megadeep.finetune.chat)
        from megadeep.data.tokenizer import open_tokenizer

        vocab = open_tokenizer(d.tokenizer).vocab_size
        if cfg.model.vocab_size not in (0, vocab):
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but data.tokenizer has {vocab} pieces; "
                              "set model.vocab_size=0 to take it from the tokenizer")
        out.model.vocab_size = vocab
        return out
    if not d.paths:
        cache = corpus_cache_dir(d)
        if not (cache / MANIFEST).is_file():
            if not build:
                raise DataError(f"data.corpus={d.corpus} is not prepared in {cache.parent}: run "
                                "`megadeep data prepare CONFIG` once before launching the ranks")
            cache.parent.mkdir(parents=True, exist_ok=True)
            log(f"megadeep: preparing data.corpus={d.corpus} in {cache} (once; later runs reuse it)")
            build_corpus(d, cache, log)
        out.data.paths = [str(cache)]
    made_with = check_manifests(out.data)[0].tokenizer
    vocab = made_with["vocab_size"]
    if out.data.document_sep < 0:  # documents end with the tokenizer's eos (megadeep.data.shards)
        out.data.document_sep = made_with["eos_id"]
    pinned = check_model_tokenizer(cfg, made_with) or bool(d.tokenizer)
    # A model whose tokenizer is pinned may have more embedding rows than the tokenizer has pieces
    # (Qwen2.5: 151,936 rows, 151,665 tokens); otherwise the two must agree.
    if cfg.model.vocab_size not in (0, vocab) and not (pinned and cfg.model.vocab_size > vocab):
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has {vocab} pieces; "
                          "set model.vocab_size=0 to take it from the tokenizer")
    out.model.vocab_size = cfg.model.vocab_size or vocab
    return out


def check_model_tokenizer(cfg: RunConfig, made_with: dict) -> bool:
    """A model imported from Hugging Face records its tokenizer (``meta.json``: ``tokenizer``); data
    made with another tokenizer (identity or vocabulary) is refused before any rank starts. True when
    ``checkpoint.resume`` names such a model and the data matches it."""
    from megadeep.checkpoint import store

    resume = Path(cfg.checkpoint.resume)
    if cfg.checkpoint.resume in ("auto", "none") or not resume.is_dir():
        return False
    path = resume if store.is_checkpoint(resume) else (store.latest(resume) or next(iter(store.candidates(resume)), None))
    if path is None:
        return False
    try:
        recorded = store.Checkpoint.open(path).meta.get("tokenizer")
    except store.CheckpointError:
        return False  # the resume itself reports a damaged checkpoint
    if not recorded:
        return False
    if made_with["sha256"] != recorded["sha256"] or made_with["vocab_size"] != recorded["vocab_size"]:
        raise DataError(f"checkpoint.resume={cfg.checkpoint.resume} holds a model imported with tokenizer "
                        f"sha256 {recorded['sha256'][:12]}… ({recorded['vocab_size']} pieces), but data.paths was "
                        f"made with sha256 {made_with['sha256'][:12]}… ({made_with['vocab_size']} pieces); "
                        "preprocess the data with the model's tokenizer (`megadeep data preprocess --tokenizer "
                        "<the Hugging Face folder>`)")
    return True
