"""``megadeep train --nproc 4`` end to end on the default config (TP=2 × DP=2, real corpus): the launcher
prepares the corpus (tokenizer, preprocessing) into a fresh cache, then the ranks train on its tokens."""
import json
import os
import re
import subprocess
import sys

from tests.helpers import ROOT


def train_4_processes(tmp_path, config: str, steps: int):
    """``megadeep train configs/<config> --nproc 4`` for ``steps`` steps; its output and metrics records."""
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.run(  # PYTHONWARNINGS=default: the deprecation warnings a user would see are shown
        [sys.executable, "-m", "megadeep", "train", str(ROOT / "configs" / config), f"train.steps={steps}",
         "optim.warmup_steps=5", f"train.eval_every={steps}", f"log.metrics_file={metrics}", "--nproc", "4"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc, [json.loads(line) for line in metrics.read_text().splitlines()]


def test_cli_trains_tiny_config_on_4_processes(tmp_path):
    proc, records = train_4_processes(tmp_path, "tiny.yaml", 30)
    assert "preprocessed 42 documents" in proc.stdout and "trained a 2048-piece bpe tokenizer" in proc.stdout
    assert "layout TP=2 DP=2 PP=1" in proc.stdout
    assert_readable_logs(proc)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r for r in steps), key
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 1.2, (first, last)  # 2048-piece BPE: ln 2048 ≈ 7.6 → under 6.3
    assert any("val_loss" in r for r in records)


def test_cli_trains_tiny_moe_config_on_4_processes(tmp_path):
    """configs/tiny-moe.yaml: 8 experts, top-2, EP=4 over DP=4; the metrics log the router's numbers."""
    proc, records = train_4_processes(tmp_path, "tiny-moe.yaml", 20)
    assert "layout TP=1 DP=4 PP=1 EP=4" in proc.stdout and "M active)" in proc.stdout, proc.stdout[-2000:]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for r in steps:
        moe = r["moe"]
        assert abs(sum(moe["load"].values()) - 1) < 1e-6 and len(moe["load"]) == 8
        assert moe["aux_loss"] >= 1 - 1e-6 and moe["dropped_fraction"] == 0 and moe["z_loss"] > 0
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.8, (first, last)


def assert_readable_logs(proc):
    """Logs a person can read: progress from rank 0 only, no line once per rank, no library warnings in
    stderr, and one start-up line naming layout, device(s), optimizer, kernels and data."""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated  # per-rank copies (DeepSpeed's accelerator / shm builder lines)
    assert sum(line.startswith("step      1/") for line in lines) <= 1
    assert not re.search(r"(Deprecation|Future|User)Warning|\[WARNING\]|real_accelerator", proc.stderr + proc.stdout), \
        proc.stderr[-3000:]
    startup = [line for line in lines if line.startswith("megadeep: ") and "| layout " in line]
    assert len(startup) == 1, startup
    assert re.search(r"layout TP=\d+ DP=\d+ PP=\d+.*\| optimizer \S.*\| device cpu x4 \| ZeRO-\d \| "
                     r"kernels (fused csrc|PyTorch) \| data tokens shakespeare$", startup[0]), startup[0]
