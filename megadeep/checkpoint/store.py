"""The on-disk side of checkpoints: atomic directories, a sha256 manifest, the ``latest`` pointer,
validation, retention and the only readers allowed to open checkpoint files.

A checkpoint is a directory ``step_XXXXXXXX`` under the run's checkpoint dir. It is written as
``.tmp-step_XXXXXXXX``, every file fsynced, ``manifest.json`` (sha256 and size of every other file)
written last inside it, then renamed into place; only after that is ``latest`` replaced (write,
fsync, rename). A crash at any point leaves either the old state or the complete new checkpoint.

Nothing here unpickles arbitrary objects: tensors come from safetensors, small state from JSON, and
the few ``.pt`` files go through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from megadeep.config.schema import ModelConfig
from megadeep.errors import CheckpointError, ConfigError

FORMAT = "megadeep-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
_TAG = re.compile(r"^step_(\d{8,})$")


def tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    m = _TAG.match(Path(path).name)
    return int(m.group(1)) if m else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(root: Path, rel: str, data) -> dict:
    """Write ``root/rel`` durably; returns its manifest record. ``data`` is bytes or a list of buffers
    written one after another (large ones go to the file straight from the tensors' memory). The
    sha256 is computed in a second thread over the same buffers while they go to disk (hashlib
    releases the GIL), so hashing hides behind the write and the fsync, and nothing is read back."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    digest: list[str] = []

    def sha256_parts() -> None:
        h = hashlib.sha256()
        for part in parts:
            h.update(part)
        digest.append(h.hexdigest())

    hasher = threading.Thread(target=sha256_parts, name="megadeep-sha256")
    hasher.start()
    try:
        with open(path, "wb", buffering=0) as f:
            for part in parts:
                view = memoryview(part)
                while view.nbytes:  # a raw write may be partial
                    view = view[f.write(view):]
            os.fsync(f.fileno())
    finally:
        hasher.join()
    return {"sha256": digest[0], "bytes": sum(memoryview(p).nbytes for p in parts)}


def write_json(root: Path, rel: str, obj) -> dict:
    return write_bytes(root, rel, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


# safetensors' dtype names (its format spec); a tensor of another dtype goes through safetensors.save
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def safetensors_parts(tensors: dict, metadata: dict[str, str] | None = None) -> list:
    """A safetensors file as [header, each tensor's bytes]: the format's 8-byte header length, JSON
    header padded to 8 bytes, then the data, largest element size first (aligned, as safetensors
    orders it). The tensors' own memory is used, not a serialised copy of the whole state: on a
    100M-parameter model that copy is the size of the checkpoint (safetensors.save builds one)."""
    import struct

    import torch

    host = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    names = sorted(host, key=lambda k: (-host[k].element_size(), k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, views = 0, []
    for name in names:
        t = host[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        if size:
            views.append(t.reshape(-1).view(torch.uint8).numpy())
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *views]


def write_tensors(root: Path, rel: str, tensors: dict, metadata: dict[str, str] | None = None) -> dict:
    if all(str(t.dtype).removeprefix("torch.") in _ST_DTYPES for t in tensors.values()):
        return write_bytes(root, rel, safetensors_parts(tensors, metadata))
    from safetensors.torch import save

    return write_bytes(root, rel, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                       metadata=metadata))


def write_pt(root: Path, rel: str, obj) -> dict:
    """Small state that is not one flat dict of tensors (RNG states); read back with weights_only."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(root, rel, buf.getvalue())


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def begin(root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (leftovers of a crashed save go)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{tag(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, files: dict[str, dict], step: int) -> Path:
    """Seal ``tmp`` with its manifest, rename it into place and point ``latest`` at it."""
    on_disk = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
    if on_disk != set(files):
        raise CheckpointError(f"{tmp}: files on disk {sorted(on_disk ^ set(files))} do not match what was written")
    write_json(tmp, MANIFEST, {"format": FORMAT, "version": VERSION, "step": step, "files": files})
    for d in {tmp / Path(f).parent for f in files}:
        fsync_dir(d)
    final = tmp.parent / tag(step)
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it as a whole
        trash = tmp.parent / f"{TMP_PREFIX}old-{tag(step)}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)
    write_atomic_text(final.parent / LATEST, final.name + "\n")
    return final


def candidates(root: Path) -> list[Path]:
    """Complete-looking checkpoints under ``root``, newest first (temporary directories never count)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when it is missing, unreadable, not a
    ``step_XXXXXXXX`` name (binary junk, a path elsewhere) or points at nothing."""
    try:
        name = (root / LATEST).read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if _TAG.match(name) is None:
        return None
    target = root / name
    return target if target.is_dir() else None


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


@dataclass
class Checkpoint:
    """An opened checkpoint: its manifest and meta, with verified access to its files."""

    path: Path
    files: dict[str, dict]
    meta: dict

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def model_config(self) -> ModelConfig:
        from megadeep.config.load import typed

        known = {f.name for f in dataclasses.fields(ModelConfig)}
        saved = {k: v for k, v in self.meta["config"]["model"].items() if k in known}
        try:
            return typed(ModelConfig, saved, "model")
        except ConfigError as e:
            raise CheckpointError(f"{self.path / META}: {e}") from None

    @classmethod
    def open(cls, path: Path) -> "Checkpoint":
        """Read and check the manifest and meta.json (cheap; file contents are checked by :meth:`verify`)."""
        path = Path(path)
        manifest = read_json(path / MANIFEST) if (path / MANIFEST).is_file() else None
        if manifest is None:
            raise CheckpointError(f"{path / MANIFEST}: missing (not a checkpoint, or an unfinished save)")
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{path / MANIFEST}: a JSON {type(manifest).__name__}, not an object")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CheckpointError(f"{path / MANIFEST}: format {manifest.get('format')!r} version "
                                  f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
        files = manifest.get("files")
        if not isinstance(files, dict) or META not in files:
            raise CheckpointError(f"{path / MANIFEST}: no file list, or meta.json is not in it")
        for rel, rec in files.items():
            ok = isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and _count(rec.get("bytes"))
            if not ok or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise CheckpointError(f"{path / MANIFEST}: malformed entry for {rel!r} (want a relative path "
                                      "with 'sha256' and 'bytes')")
        ckpt = cls(path, files, {})
        ckpt.verify([META])
        ckpt.meta = read_json(path / META)
        _check_meta(ckpt.meta, path / META)
        return ckpt

    def has(self, rel: str) -> bool:
        return rel in self.files

    def problem(self, rel: str) -> str | None:
        """What is wrong with file ``rel`` (missing, wrong size, wrong sha256), or None."""
        rec, path = self.files.get(rel), self.path / rel
        if rec is None:
            return f"{path}: not listed in the manifest"
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != rec["bytes"]:
            return f"{path}: {size} bytes, manifest says {rec['bytes']} (truncated or overwritten)"
        if sha256_file(path) != rec["sha256"]:
            return f"{path}: sha256 mismatch (corrupted)"
        return None

    def verify(self, rels) -> None:
        for rel in rels:
            if (msg := self.problem(rel)) is not None:
                raise CheckpointError(msg)

    def tensor_keys(self, rel: str) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(self.path / rel, framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{self.path / rel}: not a readable safetensors file ({e})") from None

    def read_tensors(self, rel: str, keys=None) -> dict:
        """Tensors of a safetensors file (all, or ``keys``); the file must have been verified."""
        from safetensors import safe_open

        try:
            with safe_open(self.path / rel, framework="pt") as f:
                return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}
        except Exception as e:
            raise CheckpointError(f"{self.path / rel}: not a readable safetensors file ({e})") from None

    def read_pt(self, rel: str):
        """A small ``torch.save`` file, loaded with ``weights_only=True``: no code runs on load."""
        import pickle

        import torch

        try:
            return torch.load(self.path / rel, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path / rel}: refused by torch.load(weights_only=True): {first}") from None


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_meta(meta, where: Path) -> None:
    """The fields every reader relies on, with their types: a malformed meta.json is a
    :class:`CheckpointError` (a fall-back to the previous checkpoint), never a crash."""
    def bad(what: str):
        raise CheckpointError(f"{where}: {what}")

    if not isinstance(meta, dict):
        bad(f"a JSON {type(meta).__name__}, not an object")
    for key in ("step", "consumed_samples"):
        if not _count(meta.get(key)):
            bad(f"'{key}' must be a non-negative integer, got {meta.get(key)!r}")
    layout = meta.get("layout")
    if not isinstance(layout, dict) or not all(_count(layout.get(k)) and layout[k] >= 1 for k in ("tp", "pp", "dp")):
        bad(f"'layout' must give tp, pp and dp ≥ 1, got {layout!r}")
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        bad("'config' must hold the run config with its 'model' section")
    if not isinstance(meta.get("params"), dict):
        bad("'params' must map parameter names to their specs")
    if meta.get("optimizer") is not None and not isinstance(meta["optimizer"], dict):
        bad("'optimizer' must be an object or null")


def prune(root: Path, keep_last: int, keep_every: int, protect: Path | None = None) -> list[Path]:
    """Delete checkpoints beyond the newest ``keep_last``, except every ``keep_every``-th step and
    ``protect``; also clears leftovers of crashed saves. Returns what was removed."""
    removed = []
    for i, ckpt in enumerate(candidates(root)):
        step = step_of(ckpt)
        keep = i < max(1, keep_last) or (keep_every and step % keep_every == 0)
        if not keep and ckpt != protect:
            shutil.rmtree(ckpt)
            removed.append(ckpt)
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return removed
