"""Supervised fine-tuning data: JSON lines of ``{"messages": [{"role", "content"}, ...]}``.

Each conversation is rendered with ``data.tokenizer``'s own chat template when it is a Hugging Face
folder whose ``tokenizer_config.json`` has one (see ``TemplateCodec``), else with the built-in
template below, one conversation per row, padded to ``train.seq_len + 1`` (so no sample attends
to another: rows never share a sequence), and the loss
is taken on the assistant turns only (their content and the end marker); every other target is
``-100``, which the loss ignores. The template, per message::

    <|{role}|>\\n{content}<|end|>\\n        (the loss covers "{content}<|end|>" of assistant turns)

Bad conversations are dropped and counted by reason, never truncated: ``malformed_json``,
``bad_messages`` (not a list of {role in system/user/assistant, content: str}), ``no_assistant``,
``too_long`` (more tokens than ``train.seq_len + 1``). Tokens are bytes (``data.source=bytes``) or the
pieces of ``data.tokenizer`` (``data.source=tokens``), encoded segment by segment: every segment
boundary is after a newline or inside ``{content}<|end|>``, and SentencePiece pieces never cross a
newline, so the rows are what encoding the whole rendered text gives.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from megadeep.config.schema import RunConfig
from megadeep.errors import DataError

log = logging.getLogger("megadeep.data")
ROLES = ("system", "user", "assistant")
END = "<|end|>"
IGNORE = -100
PAD = 0


def render(messages: list[dict]) -> list[tuple[str, bool]]:
    """The built-in template: (text, in the loss) segments of one conversation."""
    out = []
    for m in messages:
        out.append((f"<|{m['role']}|>\n", False))
        out.append((m["content"] + END, m["role"] == "assistant"))
        out.append(("\n", False))
    return out


class TemplateCodec:
    """A Hugging Face tokenizer folder whose ``tokenizer_config.json`` has a ``chat_template``, rendered
    by transformers' ``apply_chat_template`` (the Jinja template, as the model's users render it). The
    loss mask comes from rendering prefixes: an assistant turn's characters run from the end of the
    conversation before it rendered with ``add_generation_prompt=True`` to the end of the conversation
    through it (its content and whatever the template closes it with); a token is trained when its
    first character lies there. Templates whose prefixes do not render as prefixes are refused."""

    def __init__(self, path: str):
        from transformers import PreTrainedTokenizerFast

        self.tok = PreTrainedTokenizerFast.from_pretrained(path)
        self.vocab_size = len(self.tok)

    def _render(self, messages: list[dict], prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) if messages else ""

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        text = self._render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start, through = self._render(messages[:i], prompt=True), self._render(messages[:i + 1])
                if not (text.startswith(through) and through.startswith(start)):
                    raise DataError("data.tokenizer's chat_template does not render a conversation's prefixes as "
                                    "prefixes; the assistant turns cannot be located")
                spans.append((len(start), len(through)))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask


def encode(messages: list[dict], codec) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a conversation and whether each token is an assistant token (in the loss)."""
    if isinstance(codec, TemplateCodec):
        tokens, mask = codec.conversation(messages)
        return np.array(tokens, dtype=np.int64), np.array(mask, dtype=bool)
    tokens, mask = [], []
    for text, trained in render(messages):
        ids = codec.encode(text)
        tokens += ids
        mask += [trained] * len(ids)
    return np.array(tokens, dtype=np.int64), np.array(mask, dtype=bool)


def _problem(row) -> str | None:
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
        return "bad_messages"
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        return "no_assistant"
    return None


class Conversations:
    """Padded rows of ``seq_len + 1`` tokens and their loss masks; ``batch`` gives (tokens, targets)."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray):
        self.tokens, self.mask = tokens, mask

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows, mask = torch.from_numpy(self.tokens[indices]), torch.from_numpy(self.mask[indices])
        return rows[:, :-1], rows[:, 1:].masked_fill(~mask[:, 1:], IGNORE)


def codec_of(cfg: RunConfig):
    """Bytes, or ``data.tokenizer``, whose size must be the model's vocabulary: a Hugging Face folder
    with a ``chat_template`` renders conversations with it, anything else with the built-in template."""
    from megadeep.inference.text import ByteCodec, PieceCodec

    if not cfg.data.tokenizer:
        return ByteCodec()
    config = Path(cfg.data.tokenizer) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("chat_template"):
        codec = TemplateCodec(cfg.data.tokenizer)
    else:
        codec = PieceCodec(cfg.data.tokenizer)
    if cfg.model.vocab_size != codec.vocab_size:
        raise DataError(f"model.vocab_size={cfg.model.vocab_size} but data.tokenizer has {codec.vocab_size} pieces")
    return codec


def read_conversations(paths: list[str], seq_len: int, codec=None) -> tuple[Conversations, Counter]:
    from megadeep.inference.text import ByteCodec

    codec = codec or ByteCodec()
    width = seq_len + 1
    rows, masks, counts = [], [], Counter()
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                counts["malformed_json"] += 1
                continue
            problem = _problem(row)
            if problem is None:
                tokens, mask = encode(row["messages"], codec)
                problem = "too_long" if len(tokens) > width else None
            if problem:
                counts[problem] += 1
                continue
            counts["kept"] += 1
            rows.append(np.pad(tokens, (0, width - len(tokens)), constant_values=PAD))
            masks.append(np.pad(mask, (0, width - len(mask))))
    if not rows:
        raise DataError(f"no usable conversation in data.paths ({dict(counts) or 'empty'})")
    return Conversations(np.stack(rows), np.stack(masks)), counts


def chat_split(cfg: RunConfig):
    """The train/validation split of ``data.format=chat``: the last ``data.val_fraction`` of the
    conversations is held out."""
    from megadeep.data.loader import Split

    data, counts = read_conversations(cfg.data.paths, cfg.train.seq_len, codec_of(cfg))
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "kept") or "none"
    log.warning(f"megadeep: chat data: {counts['kept']} conversations kept, dropped: {dropped}")
    n_val = int(len(data) * cfg.data.val_fraction)
    n = len(data) - n_val
    val = Conversations(data.tokens[n:], data.mask[n:]) if n_val else None
    return Split(Conversations(data.tokens[:n], data.mask[:n]), val)
