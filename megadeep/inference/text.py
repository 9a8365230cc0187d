"""Text ↔ token ids for generation: the run's SentencePiece tokenizer, or bytes for ``data.source=bytes``."""
from __future__ import annotations

from pathlib import Path

from megadeep.errors import ConfigError


class ByteCodec:
    """One token per UTF-8 byte (the ``bytes`` data source); there is no EOS."""
    eos_id = None
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class PieceCodec:
    """A SentencePiece tokenizer (``megadeep.data.tokenizer``); prompts are encoded without BOS, as
    training documents are."""

    def __init__(self, path: str | Path):
        from megadeep.data.tokenizer import Tokenizer

        self.tok = Tokenizer(path)
        self.eos_id, self.vocab_size = self.tok.eos_id, self.tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def codec_for(run_config: dict, tokenizer: str | None = None):
    """The codec of a checkpoint's run (its ``meta.json`` config), or of ``tokenizer`` when given."""
    data = run_config.get("data", {})
    path = tokenizer or data.get("tokenizer") or ""
    if path:
        if not Path(path).exists():
            raise ConfigError(f"tokenizer '{path}' does not exist")
        return PieceCodec(path)
    if data.get("source", "bytes") == "bytes":
        return ByteCodec()
    raise ConfigError("the checkpoint's run names no tokenizer file (data.tokenizer); pass --tokenizer "
                      "(the tokenizer directory the data was prepared with)")
