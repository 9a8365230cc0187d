"""The on-disk contract, without processes: atomic saves, integrity checks, retention, no unpickling."""
import json
import pickle

import pytest
import torch

from megadeep.checkpoint import store
from megadeep.checkpoint.store import Checkpoint
from megadeep.errors import CheckpointError


def meta(step):
    """The fields readers rely on (what CheckpointManager writes, less the run config's details)."""
    return {"step": step, "consumed_samples": 8 * step, "layout": {"tp": 1, "pp": 1, "dp": 1},
            "config": {"model": {"dim": 1000}}, "optimizer": None, "rng": False,
            "params": {"w": {"shape": [1000], "partition_dim": None, "partition_blocks": None, "stage": 0,
                             "vocab": False}}}


def save(root, step, payload=None):
    tmp = store.begin(root, step)
    files = {
        "model-tp00-pp00.safetensors": store.write_tensors(tmp, "model-tp00-pp00.safetensors",
                                                           {"w": torch.arange(1000.0) + step}),
        "rng/rank00000.pt": store.write_pt(tmp, "rng/rank00000.pt", payload or {"torch": torch.get_rng_state()}),
    }
    files[store.META] = store.write_json(tmp, store.META, meta(step))
    return store.commit(tmp, files, step)


class Boom:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_commit_is_atomic_and_latest_moves_last(tmp_path):
    first = save(tmp_path, 5)
    assert store.latest(tmp_path) == first
    # A save that dies before commit: files written, never sealed.
    tmp = store.begin(tmp_path, 10)
    store.write_tensors(tmp, "model-tp00-pp00.safetensors", {"w": torch.zeros(3)})
    assert store.latest(tmp_path) == first
    assert store.candidates(tmp_path) == [first]  # the partial save is not a candidate
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint.open(tmp)
    second = save(tmp_path, 10)  # the next save of that step replaces the leftover
    assert store.latest(tmp_path) == second and not tmp.exists()
    assert [p.name for p in store.candidates(tmp_path)] == ["step_00000010", "step_00000005"]
    # A checkpoint lists exactly its files, with sizes and hashes.
    ckpt = Checkpoint.open(second)
    assert set(ckpt.files) == {"model-tp00-pp00.safetensors", "rng/rank00000.pt", "meta.json"}
    ckpt.verify(ckpt.files)
    assert torch.equal(ckpt.read_tensors("model-tp00-pp00.safetensors")["w"], torch.arange(1000.0) + 10)


def test_truncated_and_corrupted_files_are_named(tmp_path):
    ckpt_dir = save(tmp_path, 5)
    f = ckpt_dir / "model-tp00-pp00.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert "truncated" in Checkpoint.open(ckpt_dir).problem(f.name)
    corrupted = bytearray(data)
    corrupted[-10] ^= 0xFF  # same size, one flipped byte
    f.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match=r"model-tp00-pp00\.safetensors: sha256 mismatch"):
        Checkpoint.open(ckpt_dir).verify([f.name])
    (ckpt_dir / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="meta.json"):
        Checkpoint.open(ckpt_dir)


def test_malicious_pickle_never_runs(tmp_path):
    """Even with a manifest that vouches for it, a crafted pickle is refused and its code never runs."""
    marker = tmp_path / "pwned"
    ckpt_dir = save(tmp_path / "ckpt", 5)
    evil = pickle.dumps({"torch": Boom(marker)})
    for rel in ("rng/rank00000.pt", "model-tp00-pp00.safetensors"):
        (ckpt_dir / rel).write_bytes(evil)
        manifest = json.loads((ckpt_dir / store.MANIFEST).read_text())
        manifest["files"][rel] = {"sha256": store.sha256_bytes(evil), "bytes": len(evil)}
        (ckpt_dir / store.MANIFEST).write_text(json.dumps(manifest))
    ckpt = Checkpoint.open(ckpt_dir)
    ckpt.verify(ckpt.files)  # integrity holds: the attacker controls the whole directory
    with pytest.raises(CheckpointError, match=r"rank00000\.pt: refused by torch\.load\(weights_only=True\)"):
        ckpt.read_pt("rng/rank00000.pt")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt.read_tensors("model-tp00-pp00.safetensors")
    assert not marker.exists()
    pickle.loads(evil)  # the control: plain unpickling does run it
    assert marker.exists()


def test_retention_keeps_last_k_and_every_nth(tmp_path):
    for step in range(1, 13):
        save(tmp_path, step)
    (tmp_path / ".tmp-step_00000013").mkdir()  # leftover of a crashed save
    store.prune(tmp_path, keep_last=3, keep_every=5)
    assert [store.step_of(p) for p in store.candidates(tmp_path)] == [12, 11, 10, 5]
    assert not (tmp_path / ".tmp-step_00000013").exists()


def test_streamed_safetensors_file_is_what_safetensors_reads_and_its_hash_is_the_files(tmp_path):
    """write_tensors streams the tensors' memory (no serialised copy): the file must still be a valid
    safetensors file (every dtype, empty and non-contiguous tensors, metadata) with the manifest's
    sha256 and size equal to the bytes on disk."""
    import hashlib

    from safetensors import safe_open

    tensors = {"f32": torch.randn(3, 5), "f64": torch.randn(7).double(), "bf16": torch.randn(4, 4).bfloat16(),
               "empty": torch.zeros(0), "u8": torch.randint(0, 5, (9,), dtype=torch.uint8),
               "strided": torch.arange(6).reshape(2, 3).t(), "flags": torch.tensor([True, False])}
    rec = store.write_tensors(tmp_path, "t.safetensors", tensors, {"kind": "model"})
    data = (tmp_path / "t.safetensors").read_bytes()
    assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"kind": "model"} and sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t), k
