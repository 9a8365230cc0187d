"""Raw documents from text files (one document per file) and JSON-lines files (one per line, text in a
named field; ``.gz`` is read transparently).

Reading is split in two so that the expensive half runs in worker processes: :func:`read_records`
(main process) only cuts the input into raw records, refusing oversize ones without loading them;
:func:`decode_record` (worker) turns a record into text or the reason it is unusable.
"""
from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from megadeep.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
FORMATS = ("auto", "text", "jsonl")

# A record: (kind, raw bytes, reason, size in bytes). kind is "text" or "json"; reason is set (and raw
# is None) when the record was refused while reading.
Record = tuple[str, "bytes | None", "str | None", int]


def input_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.name.endswith(JSONL_SUFFIXES) else "text"


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (their files, recursively, sorted) and glob patterns, in the order given."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise DataError(f"input '{item}' matches no file")
            out += matches
    return out


def _jsonl_lines(path: Path, max_bytes: int) -> Iterator[Record]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        while True:
            line = f.readline(max_bytes + 1)
            if not line:
                return
            if len(line) > max_bytes and not line.endswith(b"\n"):
                size = len(line)
                while line and not line.endswith(b"\n"):  # skip the rest of the line, a block at a time
                    line = f.readline(1 << 20)
                    size += len(line)
                yield "json", None, "too_large", size
            else:
                yield "json", line, None, len(line)


def read_records(paths: list[Path], fmt: str, max_bytes: int) -> Iterator[Record]:
    for path in paths:
        if input_format(path, fmt) == "jsonl":
            yield from _jsonl_lines(path, max_bytes)
        elif (size := path.stat().st_size) > max_bytes:
            yield "text", None, "too_large", size
        else:
            yield "text", path.read_bytes(), None, size


def decode_record(kind: str, raw: bytes, field: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason): invalid_utf8, invalid_json, missing_field or empty."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if kind == "json":
        if not text.strip():
            return None, "empty"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None, "invalid_json"
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            return None, "missing_field"
    if not text.strip():
        return None, "empty"
    return text, None
