"""Raw documents from text files (one document per file), JSON lines (``.jsonl``, ``.jsonl.gz``,
``.jsonl.zst``: one per line, text in a named field) and Parquet (one per row, text in a named column).

:class:`InputReader` is a datatrove reader (it gets datatrove's sharding of files over tasks, its
compressed-file opening and its document stream), but it parses records itself: datatrove's
``JsonlReader``/``ParquetReader`` skip a bad line or row with a log warning and end a task on a truncated
``.gz``, while megadeep counts every unusable record by reason, so that documents in = kept + dropped.
A bad record is a :class:`~datatrove.data.Document` with empty text and ``metadata["drop"]`` set.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.readers.base import BaseDiskReader

from megadeep.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED = (".gz", ".zst")
FORMATS = ("auto", "text", "jsonl", "parquet")
_BOM = b"\xef\xbb\xbf"


def input_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path
    for c in COMPRESSED:
        name = name.removesuffix(c)
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


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
    return [p.resolve() for p in out]


def check_columns(paths: list[Path], fmt: str, field: str) -> None:
    """Every Parquet input has the text column (its schema is read, not its data)."""
    import pyarrow.parquet as pq

    for p in paths:
        if input_format(str(p), fmt) != "parquet":
            continue
        try:
            names = pq.read_schema(p).names
        except Exception:  # a damaged file: counted as corrupt_file when read
            continue
        if field not in names:
            raise DataError(f"{p} has no column '{field}' (columns: {', '.join(names)}); set --text-field")


def decode_json(line: bytes, field: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for one JSON line: empty, invalid_utf8, invalid_json, missing_field."""
    import orjson

    if not line.strip():
        return None, "empty"
    try:
        obj = orjson.loads(line)  # strict: rejects invalid UTF-8 and lone surrogates too
    except orjson.JSONDecodeError:
        try:
            text = line.decode("utf-8")
            json.loads(text)
        except UnicodeDecodeError:
            return None, "invalid_utf8"
        except json.JSONDecodeError:
            return None, "invalid_json"
        return None, "invalid_utf8"  # valid JSON to Python, but a lone surrogate escape (\ud800): not Unicode text
    text = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return None, "missing_field"
    return (text, None) if text.strip() else (None, "empty")


def decode_text(raw: bytes) -> tuple[str | None, str | None]:
    try:
        text = raw.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    return (text, None) if text.strip() else (None, "empty")


# what a damaged compressed stream raises part-way (gzip, zlib, zstandard)
_CORRUPT = (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError)


class InputReader(BaseDiskReader):
    """Every input format, every record accounted for: a good one is a document with text and
    ``metadata["nbytes"]`` (raw bytes read), a bad one has ``metadata["drop"]`` (the reason)."""

    name = "megadeep input"

    def __init__(self, paths_file: str, fmt: str, text_field: str, max_doc_bytes: int):
        # paths are absolute, listed relative to "/" (datatrove joins them to data_folder)
        super().__init__("/", paths_file=paths_file, text_key=text_field, add_file_path=False)
        self.fmt, self.field, self.max_bytes = fmt, text_field, max_doc_bytes

    def read_file(self, filepath: str) -> Iterator[Document]:
        path = "/" + filepath.lstrip("/")  # datatrove hands paths relative to its data folder, "/"
        kind = input_format(path, self.fmt)
        records = (self._jsonl if kind == "jsonl" else self._parquet if kind == "parquet" else self._text)(path)
        for i, (text, reason, nbytes) in enumerate(records):
            meta = {"nbytes": nbytes} if reason is None else {"nbytes": nbytes, "drop": reason}
            yield Document(text or "", f"{path}:{i}", metadata=meta)

    def _text(self, path: str) -> Iterator[tuple]:
        size = Path(path).stat().st_size
        if size > self.max_bytes:
            yield None, "too_large", size
            return
        with self.data_folder.open(path.lstrip("/"), "rb", compression="infer") as f:
            try:
                raw = f.read()
            except _CORRUPT:
                yield None, "corrupt_file", size
                return
        yield *decode_text(raw), len(raw)

    def _jsonl(self, path: str) -> Iterator[tuple]:
        """Lines are read in bounded pieces (an oversize line is skipped unread); a damaged compressed
        stream ends the file with one ``corrupt_file`` record, keeping the lines before it."""
        with self.data_folder.open(path.lstrip("/"), "rb", compression="infer") as stream:
            f = io.BufferedReader(stream, 1 << 20) if path.endswith(".zst") else stream  # zstandard has no readline
            first = True
            while True:
                try:
                    line = f.readline(self.max_bytes + 1)
                    if len(line) > self.max_bytes and not line.endswith(b"\n"):
                        size = len(line)
                        while line and not line.endswith(b"\n"):  # skip the rest, a block at a time
                            line = f.readline(1 << 20)
                            size += len(line)
                        yield None, "too_large", size
                        continue
                except _CORRUPT:
                    yield None, "corrupt_file", 0
                    return
                if not line:
                    return
                if first:  # a UTF-8 byte order mark is not part of the first record
                    line, first = line.removeprefix(_BOM), False
                yield *decode_json(line, self.field), len(line)

    def _parquet(self, path: str) -> Iterator[tuple]:
        """Row groups are streamed in batches of the text column only (pyarrow), so memory is bounded."""
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for a damaged file
            yield None, "corrupt_file", Path(path).stat().st_size
            return
        with pf:
            for batch in pf.iter_batches(batch_size=1024, columns=[self.field]):
                for text in batch.column(0).to_pylist():
                    if not isinstance(text, str):
                        yield None, "missing_field", 0
                    else:
                        yield (text, None, len(text.encode())) if text.strip() else (None, "empty", len(text.encode()))
