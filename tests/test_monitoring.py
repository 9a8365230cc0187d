"""FLOP/MFU arithmetic, the metrics file and TensorBoard events of a short run, and `megadeep plot`."""
import json

import pytest

from megadeep.cli import main
from megadeep.config import load_config, resolve
from megadeep.config.schema import ModelConfig
from megadeep.monitoring.flops import flops_per_token, gpu_peak_flops, mfu
from megadeep.training.trainer import train
from tests.helpers import write_text


def test_flops_per_token_by_hand():
    # The default tiny model, tied: embedding 256·128 = 32,768; per layer q 128·128 + k,v 2·128·64 +
    # o 128·128 = 49,152, SwiGLU 3·128·384 = 147,456, two norms 256 → 196,864; ×4 layers + final norm 128
    # → N = 820,352. Per token at s=128: 6N + 12·L·h·s = 4,922,112 + 786,432.
    tiny = ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384)
    assert flops_per_token(tiny, 128) == 5_708_544
    # Llama-2-7B shape, untied: per layer 4·4096² + 3·4096·11008 + 2·4096 = 202,383,360; ×32 + head
    # 32000·4096 + final norm 4096 = 6,607,343,616 matmul parameters (the input table is a lookup).
    # 6N + 12·32·4096·4096 = 39,644,061,696 + 6,442,450,944.
    llama7b = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, tie_embeddings=False)
    assert flops_per_token(llama7b, 4096) == 46_086_512_640
    # 3000 tokens/s per A100 (312 TFLOP/s bf16 dense): 3000 · 46,086,512,640 / 312e12.
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert mfu(3000, flops_per_token(llama7b, 4096), 312e12) == pytest.approx(0.443139544615, rel=1e-9)
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert mfu(1000, 1e9, None) is None


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    text = write_text(d / "text.txt", 4000)
    cfg = resolve(load_config(None, [
        "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=64", "model.max_seq_len=32",
        "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=2", "train.steps=4",
        "train.eval_every=2", "optim.warmup_steps=1", f"data.paths=[{text}]", f"log.metrics_file={d / 'm.jsonl'}",
        f"log.tensorboard_dir={d / 'tb'}", "log.comm_stats=true", "log.progress=false",
    ]), 1)
    train(cfg)
    return d


def test_metrics_file_holds_every_step_with_its_keys(short_run):
    records = [json.loads(line) for line in (short_run / "m.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "skipped_steps",
                "memory", "comm_bytes"):
        assert all(key in r for r in steps), key
    assert all(r["mfu"] > 0 and r["memory"]["max_rss_mb"] > 0 for r in steps)
    assert all(set(r["comm_bytes"]) == {"tp", "dp", "pp"} for r in steps)
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]


def test_tensorboard_events_hold_the_scalars(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(short_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "memory/max_rss_mb"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]


def test_plot_writes_non_empty_pngs(short_run, capsys):
    assert main(["plot", str(short_run / "m.jsonl"), "--out", str(short_run / "plots")]) == 0
    for name in ("loss", "lr", "throughput", "mfu"):
        png = short_run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_of_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
