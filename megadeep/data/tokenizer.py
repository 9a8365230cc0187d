"""Tokenizers: SentencePiece (training on a sample of a corpus, loading) and Hugging Face
``tokenizer.json`` folders (loading, through the ``tokenizers`` library), and their identity.

A megadeep-trained tokenizer is a directory holding ``tokenizer.model`` and ``tokenizer.json`` (the
settings it was trained with, its vocabulary size, special ids and the model's sha256). A Hugging Face
model folder holds its own ``tokenizer.json`` (and ``tokenizer_config.json`` naming bos/eos), which
:func:`open_tokenizer` prefers. Datasets record the identity, so a model is never trained on tokens of
another tokenizer than the one it was built for.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from megadeep.data.pii import PLACEHOLDERS
from megadeep.errors import DataError

MODEL_FILE, INFO_FILE = "tokenizer.model", "tokenizer.json"
HF_FILE, HF_CONFIG = "tokenizer.json", "tokenizer_config.json"  # a Hugging Face folder's (same name as INFO_FILE)
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
MODEL_TYPES = ("bpe", "unigram")


@dataclass
class TokenizerSettings:
    vocab_size: int = 8000
    model_type: str = "bpe"  # bpe | unigram
    character_coverage: float = 0.9995  # rarer characters are spelled with byte-fallback pieces
    max_sentences: int = 1_000_000  # lines sampled (reservoir) from the corpus for training
    seed: int = 1234


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, settings: TokenizerSettings,
                    threads: int | None = None) -> dict:
    """Train on the lines of ``texts`` and write ``out_dir/tokenizer.{model,json}``; returns the info."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(settings.seed)
    spm.set_min_log_level(2)  # warnings and errors only
    model = io.BytesIO()  # written by us: spm would record its output path inside the model
    lines = _lines(texts)
    first = next(lines, None)
    if first is None:
        raise DataError("no usable document to train a tokenizer on: every input was empty, unreadable or "
                        "failed the quality rules (`megadeep data preprocess` counts the reasons)")
    spm.SentencePieceTrainer.train(
        sentence_iterator=chain([first], lines), model_writer=model,
        model_type=settings.model_type, vocab_size=settings.vocab_size,
        character_coverage=settings.character_coverage, input_sentence_size=settings.max_sentences,
        shuffle_input_sentence=True, num_threads=threads or os.cpu_count() or 1,
        byte_fallback=True, split_digits=True, required_chars="0123456789", hard_vocab_limit=False,
        # keep the text as it is: megadeep normalises Unicode itself, and whitespace is content
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,  # so that text encodes the same whole or cut at line ends (see encode)
        user_defined_symbols=list(PLACEHOLDERS.values()), **SPECIAL_IDS,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
    )
    (out / MODEL_FILE).write_bytes(model.getvalue())
    tok = Tokenizer(out / MODEL_FILE)
    info = {"settings": asdict(settings), **tok.identity(), "sentencepiece_version": spm.__version__}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def _line_chunks(text: str, size: int = 4096) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


class Tokenizer:
    """A loaded SentencePiece model; ``encode`` gives ids without bos/eos (packing adds eos)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise DataError(f"tokenizer '{path}' does not exist; train one with `megadeep data train-tokenizer`")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"tokenizer '{path}' is not a SentencePiece model ({str(e).splitlines()[0][:120]})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    def encode(self, text: str) -> np.ndarray:
        """Token ids (uint32) of one text, without bos/eos."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text. All texts are cut into pieces after a newline (the same ids: no piece
        contains a newline, and there is no dummy prefix) and encoded in one SentencePiece call, which
        amortises the per-call overhead over many documents."""
        pieces, owner = [], []
        for i, text in enumerate(texts):
            chunks = list(_line_chunks(text))
            pieces += chunks
            owner += [i] * len(chunks)
        out: list[list] = [[] for _ in texts]
        for i, ids in zip(owner, self.sp.encode(pieces)):
            out[i].append(ids)
        return [np.fromiter(chain.from_iterable(ids), np.uint32) for ids in out]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def identity(self) -> dict:
        return {"sha256": sha256_file(self.path), "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": self.sp.bos_id(), "pad_id": self.sp.pad_id(), "unk_id": self.sp.unk_id()}

    def files(self) -> list[Path]:
        """What a dataset copies next to its shards (the model first: the manifest names it)."""
        info = self.path.parent / INFO_FILE
        return [self.path] + ([info] if info.is_file() else [])


def _special(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``. Documents are encoded whole with the tokenizer's own special
    tokens (its post-processor adds bos where the model expects one, e.g. Llama 3); packing then ends
    each document with eos, which ``tokenizer_config.json`` names (or ``eos_token`` of the folder's
    config.json). Unlike SentencePiece without a dummy prefix, byte-level BPE merges across newlines
    ("\n\n" is one token), so documents are not cut at line ends."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Rust

        path = Path(path)
        self.path = path / HF_FILE if path.is_dir() else path
        try:
            self.tok = Rust.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise DataError(f"tokenizer '{self.path}' is not a Hugging Face tokenizer.json "
                            f"({str(e).splitlines()[0][:120]})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        config_file = self.path.parent / HF_CONFIG
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        ids = {k: self.tok.token_to_id(t) for k in ("bos", "eos", "pad", "unk")
               if (t := _special(config, f"{k}_token")) is not None}
        model_config = self.path.parent / "config.json"
        if "eos" not in ids and model_config.is_file():
            eos = json.loads(model_config.read_text()).get("eos_token_id")
            ids["eos"] = eos[0] if isinstance(eos, list) else eos
        if ids.get("eos") is None:
            raise DataError(f"tokenizer '{self.path}': no eos token (tokenizer_config.json eos_token or config.json "
                            "eos_token_id); packing needs one to end each document")
        self.eos_id, self.ids = int(ids["eos"]), ids

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text with the tokenizer's own special tokens, less a trailing eos (packing adds it)."""
        out = []
        for enc in self.tok.encode_batch_fast(texts, add_special_tokens=True):  # no offsets: ~15% faster
            ids = enc.ids[:-1] if enc.ids and enc.ids[-1] == self.eos_id else enc.ids
            out.append(np.asarray(ids, dtype=np.uint32))
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def identity(self) -> dict:
        return {"sha256": sha256_file(self.path), "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                **{f"{k}_id": v for k, v in self.ids.items() if k != "eos"}, "kind": "huggingface"}

    def files(self) -> list[Path]:
        config = self.path.parent / HF_CONFIG
        return [self.path] + ([config] if config.is_file() else [])


def train_hf_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Path:
    """A Llama-3-style byte-level BPE trained with ``tokenizers`` on ``texts``, saved as a Hugging Face
    folder: its post-processor puts <|begin_of_text|> before each text, tokenizer_config.json names bos
    and eos. (Published models ship their own; this makes one where none can be downloaded: tests, benchmarks.)"""
    from tokenizers import Tokenizer as Rust
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Rust(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / HF_FILE))
    (out / HF_CONFIG).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
                                             "eos_token": eos}) + "\n")
    return out


def _is_hf_json(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'"model"' in head or b'"added_tokens"' in head or b'"truncation"' in head  # megadeep's info has none


def open_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """The tokenizer ``path`` names: a Hugging Face ``tokenizer.json`` (or a folder holding one), else a
    SentencePiece model (or a folder holding ``tokenizer.model``)."""
    path = Path(path)
    candidate = path / HF_FILE if path.is_dir() else path
    if candidate.suffix == ".json" and candidate.is_file() and _is_hf_json(candidate):
        return HFTokenizer(candidate)
    return Tokenizer(path)
