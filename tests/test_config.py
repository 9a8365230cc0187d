"""The typed run config: loading, overrides, validation errors (one line, exit 2), DeepSpeed composition."""
import json
import subprocess
import sys
import time

import pytest

from megadeep.cli import main
from megadeep.config import load_config, resolve
from megadeep.config.deepspeed import compose
from megadeep.errors import ConfigError
from tests.helpers import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")

# (overrides, --nproc, a fragment the one-line message must contain)
INVALID = [
    (["parallel.tp=3"], 4, "world size 4 is not divisible by parallel.tp × parallel.pp"),
    (["parallel.tp=2", "parallel.dp=3"], 4, "parallel.dp × tp × pp"),
    (["parallel.tp=4", "model.n_heads=2", "model.n_kv_heads=2"], 4, "model.n_heads=2 is not divisible by parallel.tp=4"),
    (["parallel.tp=4", "model.n_kv_heads=2"], 4, "model.n_kv_heads=2 is not divisible by parallel.tp=4"),
    (["model.n_kv_heads=3"], 4, "not a multiple of model.n_kv_heads=3"),
    (["model.dim=130"], 4, "model.dim=130 is not divisible by model.n_heads=4"),
    (["model.ffn_dim=383"], 4, "FFN width 383 is not divisible by parallel.tp=2"),
    (["train.global_batch_size=12"], 4, "train.global_batch_size=12 must equal micro_batch_size × grad_accum_steps × DP"),
    (["train.grad_accum_steps=3"], 4, "train.global_batch_size=16 must equal"),
    (["parallel.pp=2", "parallel.tp=1", "deepspeed.config=zero2"], 4, "ZeRO stage 2"),
    (["parallel.pp=2", "parallel.tp=1", "deepspeed.config=zero3"], 4, "ZeRO stage 3"),
    (["parallel.pp=8", "parallel.tp=1"], 8, "more pipeline stages than model.n_layers"),
    (["train.seq_len=512"], 4, "train.seq_len=512 must be between 1 and model.max_seq_len=128"),
    (["parallel.sequence_parallel=true", "parallel.tp=4", "model.n_kv_heads=4", "train.seq_len=126"], 4,
     "sequence parallel splits train.seq_len=126"),
    (["train.precision=fp8"], 4, "train.precision must be one of fp32, bf16, fp16"),
    (["deepspeed.config=zero9"], 4, "deepspeed.config 'zero9' is not a shipped recipe"),
    (["optim.warmup_steps=500"], 4, "optim.warmup_steps=500 must be between 0 and train.steps=200"),
    (["optim.min_lr=1.0"], 4, "optim.min_lr"),
    (["model.dimm=3"], 4, "unknown config key 'model.dimm'"),
    (["model.dim=big"], 4, "model.dim must be an integer"),
    (["parallel.sequence_parallel=yes"], 4, "parallel.sequence_parallel must be true or false, got 'yes'"),
    (["tp=2"], 4, "unknown config key 'tp'"),
    (["parallel.tp"], 4, "is not of the form key=value"),
    ([], 0, "--nproc must be ≥ 1"),
    (["checkpoint.resume=/nonexistent/step_00000005"], 4, "is neither a checkpoint"),
    (["checkpoint.keep_last=0"], 4, "checkpoint.keep_last must be ≥ 1"),
    (["train.loss_spike_factor=0.5"], 4, "train.loss_spike_factor must be 0 (off) or > 1"),
    (["train.max_consecutive_skips=0"], 4, "train.max_consecutive_skips must be ≥ 1"),
    (["parallel.tp=1", "parallel.cp=2", "train.seq_len=126"], 4, "cuts train.seq_len=126 into 2·cp=4 zig-zag chunks"),
    (["parallel.tp=1", "parallel.cp=3"], 4, "world size 4 is not divisible by parallel.tp × cp × pp"),
    (["parallel.tp=1", "parallel.cp=4", "parallel.cp_attention=ulysses"], 4,
     "cp_attention=ulysses splits the 2 KV heads of a TP rank"),
    (["parallel.cp_attention=ring"], 4, "parallel.cp_attention must be one of auto, ulysses, allgather"),
    (["parallel.tp=1", "parallel.cp=2", "model.dropout=0.1"], 4, "parallel.cp=2 with model dropout"),
    (["parallel.tp=4", "parallel.cp=2", "parallel.sequence_parallel=true", "train.seq_len=12"], 8,
     "sequence parallel splits train.seq_len=12 over parallel.tp=4 (of each of cp=2 slices)"),
    (["data.document_positions=true"], 4, "data.document_positions restarts RoPE"),
    (["data.document_mask=true", "parallel.pp=2", "parallel.tp=1"], 4, "data.document_mask with parallel.pp=2"),
]


@pytest.mark.parametrize("overrides,nproc,fragment", INVALID)
def test_invalid_config_is_one_line_exit_2(overrides, nproc, fragment, capsys):
    code = main(["train", TINY, *overrides, "--nproc", str(nproc)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("megadeep: error: "), err
    assert fragment in err, err


def test_invalid_config_fails_before_spawning(tmp_path):
    """For real, in a fresh process: exit 2, one line on stderr, no traceback, no ranks started."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "megadeep", "train", TINY, "parallel.tp=3", "--nproc", "4"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "torch.distributed" not in proc.stdout + proc.stderr
    assert time.time() - start < 20


def test_missing_or_broken_files(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    assert main(["train", str(bad)]) == 2
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 64}))
    assert main(["train", TINY, f"deepspeed.config={recipe}", "--nproc", "4"]) == 2
    errs = capsys.readouterr().err.splitlines()
    assert len(errs) == 3
    assert "does not exist" in errs[0] and "not valid YAML at line" in errs[1]
    assert "sets 'train_batch_size', which megadeep fills from the run config" in errs[2]


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["parallel.tp=1", "optim.lr=1e-4", "data.paths=[a.txt, b.txt]", "model.n_kv_heads=null",
                             "model.fused_kernels=off"])
    assert cfg.model.fused_kernels == "off"  # YAML 1.2: on/off/yes/no are strings, not booleans
    assert cfg.parallel.tp == 1 and cfg.optim.lr == 1e-4 and cfg.data.paths == ["a.txt", "b.txt"]
    assert cfg.model.n_kv_heads is None and cfg.model.kv_heads == cfg.model.n_heads


def test_resolve_derives_dp_and_accumulation():
    cfg = resolve(load_config(TINY, ["train.global_batch_size=64"]), 8)
    assert (cfg.parallel.tp, cfg.parallel.dp, cfg.train.grad_accum_steps) == (2, 4, 2)
    with pytest.raises(ConfigError):
        resolve(load_config(TINY), 3)


def test_deepspeed_config_is_filled_from_the_run_config():
    cfg = resolve(load_config(TINY, ["deepspeed.config=zero2", "train.precision=bf16", "optim.grad_clip=0.5"]), 4)
    ds = compose(cfg)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"] == {"enabled": True}
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 8, 1)
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95] and ds["optimizer"]["params"]["weight_decay"] == 0.1
