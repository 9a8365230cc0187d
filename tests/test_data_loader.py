"""Token datasets as the trainer reads them: packing, seeded shuffle, exact resume, DP sharding,
blending by weight, train/validation split, and the vocabulary taken from the tokenizer."""
import json
import random

import numpy as np
import pytest

from megadeep.cli import main
from megadeep.config import load_config, resolve
from megadeep.config.schema import DataConfig
from megadeep.data.dataset import Blend, PackedTokens, token_split
from megadeep.data.loader import Loader
from megadeep.data.prepare import prepare_data
from megadeep.data.preprocess import PreprocessSettings, preprocess
from megadeep.data.sampler import DistributedSampler
from megadeep.data.tokenizer import Tokenizer, TokenizerSettings, train_tokenizer
from megadeep.errors import ConfigError, DataError
from tests.helpers import ROOT, WORDS


def docs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 300))) for _ in range(n)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two datasets made with one tokenizer: 'a' in several shards, 'b' in one."""
    root = tmp_path_factory.mktemp("ds")
    train_tokenizer(docs(0, 200), root / "tok", TokenizerSettings(vocab_size=400), threads=1)
    out = {}
    for name, seed, shard in (("a", 1, 4000), ("b", 2, 10**6)):
        texts = docs(seed, 60)
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        s = PreprocessSettings(workers=1, shard_tokens=shard)
        s.dedup.near = False
        preprocess([str(root / f"{name}.jsonl")], root / name, root / "tok", s)
        out[name] = (root / name, texts)
    return root, out


def test_documents_are_packed_with_eos(datasets):
    root, sets = datasets
    path, texts = sets["a"]
    tok = Tokenizer(root / "tok")
    stream = np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in texts])
    split = token_split(DataConfig(paths=[str(path)], val_fraction=0.0), 64, 0)
    n = len(split.train)
    assert n == (len(stream) - 1) // 64 and split.val is None
    assert len(split.train.shards) > 2
    rows = split.train.rows(np.arange(n))  # samples span documents and shard files
    assert np.array_equal(rows[:, :-1].reshape(-1), stream[: n * 64])
    assert np.array_equal(rows[:, 1:].reshape(-1), stream[1: n * 64 + 1])
    inputs, targets = split.train.batch(np.array([3, 0]))
    assert inputs.shape == (2, 64) and np.array_equal(inputs[0, 1:].numpy(), targets[0, :-1].numpy())


def test_validation_is_the_held_out_tail(datasets):
    _, sets = datasets
    d = DataConfig(paths=[str(sets["a"][0])], val_fraction=0.1)
    split = token_split(d, 32, 0)
    total = sum(len(s) for s in split.train.shards)
    n_val = int(total * 0.1)
    assert len(split.train) == (total - n_val - 1) // 32 and len(split.val) == (n_val - 1) // 32
    last_train = split.train.start + len(split.train) * 32 + 1
    assert last_train <= total - n_val == split.val.start  # no training window reaches into validation


def loader_batches(dataset, steps, micro, dp_rank, dp, seed, consumed=0):
    loader = Loader(dataset, micro, dp_rank, dp, seed, consumed=consumed)
    return [next(loader)[0].numpy() for _ in range(steps)], loader.consumed


def test_same_seed_same_samples_and_exact_resume(datasets):
    _, sets = datasets
    train = token_split(DataConfig(paths=[str(sets["a"][0])]), 32, 0).train
    n = len(train)
    steps = 2 * n // (4 * 2) + 3  # over two epoch boundaries
    full, consumed = loader_batches(train, steps, 4, 1, 2, seed=7)
    again, _ = loader_batches(train, steps, 4, 1, 2, seed=7)
    other, _ = loader_batches(train, steps, 4, 1, 2, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(full, again))
    assert not all(np.array_equal(a, b) for a, b in zip(full, other))
    assert consumed == steps * 8
    for k in (1, 5, n // 8, n // 8 + 1, steps - 1):  # resume from a consumed-samples count
        tail, _ = loader_batches(train, steps - k, 4, 1, 2, seed=7, consumed=k * 8)
        assert all(np.array_equal(a, b) for a, b in zip(tail, full[k:])), k


def test_dp_shards_are_disjoint_and_cover_each_epoch():
    for n, micro, dp in ((96, 4, 3), (101, 2, 4), (7, 1, 7)):
        per_step = micro * dp
        steps = 3 * n // per_step + 2
        seen = {r: np.concatenate([DistributedSampler(n, micro, r, dp, seed=3).indices(s * per_step)
                                   for s in range(steps)]) for r in range(dp)}
        # reassemble the global stream: step s reads [rank 0's micro, rank 1's micro, ...]
        stream = np.stack([seen[r].reshape(steps, micro) for r in range(dp)], axis=1).reshape(-1)
        for e in range(len(stream) // n):
            epoch = stream[e * n: (e + 1) * n]
            assert sorted(epoch.tolist()) == list(range(n)), (n, micro, dp, e)
        first = stream[:n]
        assert not np.array_equal(first, np.arange(n))  # shuffled


def test_blend_by_weight():
    a = PackedTokens([np.arange(0, 800, dtype=np.uint16)], 0, 800, 7, "a")  # 114 samples, tokens < 1000
    b = PackedTokens([np.arange(1000, 1300, dtype=np.uint16)], 0, 300, 7, "b")  # 42 samples, tokens ≥ 1000
    blend = Blend([a, b], [1.0, 3.0], seed=5)
    n = len(a) + len(b)
    assert len(blend) == n and list(blend.counts) == [39, 117]
    rows = blend.rows(np.arange(n))
    from_b = rows[:, 0] >= 1000
    assert from_b.sum() == 117
    assert abs(from_b[: n // 2].sum() - 117 / 2) <= 1  # spread evenly, not one dataset after the other
    starts = rows[from_b, 0] - 1000
    counts = np.bincount(starts // 7, minlength=len(b))
    assert counts.min() == 2 and counts.max() == 3  # b upsampled 117/42: every sample 2 or 3 times
    assert len(set(rows[~from_b, 0].tolist())) == 39  # a downsampled: 39 distinct samples, none twice
    assert np.array_equal(Blend([a, b], [1.0, 3.0], seed=5).rows(np.arange(n)), rows)


def test_blended_token_split_and_loader(datasets):
    root, sets = datasets
    d = DataConfig(paths=[str(sets["a"][0]), str(sets["b"][0])], weights=[1.0, 1.0])
    split = token_split(d, 32, 0)
    assert isinstance(split.train, Blend) and isinstance(split.val, Blend)
    assert abs(split.train.counts[0] - split.train.counts[1]) <= 1
    batches, _ = loader_batches(split.train, 5, 4, 0, 2, seed=1)
    assert len(batches) == 5 and batches[0].shape == (4, 32)


def test_vocab_comes_from_the_tokenizer(datasets, tmp_path):
    root, sets = datasets
    path = str(sets["a"][0])
    base = [f"data.paths=[{path}]", "data.source=tokens", "parallel.tp=1", "train.global_batch_size=4",
            "train.micro_batch_size=4"]
    cfg = prepare_data(resolve(load_config(None, base), 1))
    assert cfg.model.vocab_size == 400 and cfg.data.paths == [path]
    with pytest.raises(ConfigError, match="model.vocab_size=512 but the data's tokenizer has 400 pieces"):
        prepare_data(resolve(load_config(None, base + ["model.vocab_size=512"]), 1))
    with pytest.raises(DataError, match="not the tokenizer"):
        other = tmp_path / "tok2"
        train_tokenizer(docs(9, 100), other, TokenizerSettings(vocab_size=350), threads=1)
        prepare_data(resolve(load_config(None, base + [f"data.tokenizer={other}"]), 1))
    # bytes: 256, no tokenizer file needed (the text itself must exist: checked before launch)
    (tmp_path / "x.txt").write_text("some text\n")
    assert resolve(load_config(None, [f"data.paths=[{tmp_path / 'x.txt'}]", "train.global_batch_size=4",
                                      "train.micro_batch_size=4"]), 1).model.vocab_size == 256


def test_corpus_not_prepared_is_refused_under_a_launcher(tmp_path, monkeypatch, capsys):
    """A rank started by torchrun/srun never builds data while the others wait."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    code = main(["train", str(ROOT / "configs" / "tiny.yaml"), f"data.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "is not prepared" in err and "megadeep data prepare" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides,fragment", [
    (["data.source=text"], "data.source must be bytes or tokens"),
    (["data.weights=[1.0]"], "data.weights needs one positive weight per data.paths entry"),
    (["data.tokenizer_vocab=100"], "data.tokenizer_vocab=100 is too small"),
    (["data.source=bytes", "model.vocab_size=100"], "too small for data.source=bytes"),
    (["data.val_fraction=1.5"], "data.val_fraction must be in [0, 1)"),
    (["data.corpus="], "no training data"),
])
def test_data_config_errors_are_one_line(overrides, fragment, capsys):
    assert main(["train", str(ROOT / "configs" / "tiny.yaml"), *overrides, "--nproc", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err
