"""ZeRO-3's "auto" sizes (``config.deepspeed.layer_sized``): the composed DeepSpeed config and the
planner's buffer estimate size the reduce bucket, prefetch, live parameters and optimizer sub-group
from one decoder layer of the rank's parameters (bench/construction.py measures what that does to a
rank's peak memory)."""
import dataclasses

from megadeep.config import load_config, resolve
from megadeep.config.deepspeed import LAYER_SIZED, compose, load_recipe
from megadeep.model.accounting import layers_param_numels
from megadeep.planner import estimate as est
from megadeep.planner.hardware import GPUS, Cluster
from megadeep.planner.search import PRESETS


def test_auto_sizes_are_one_layer_of_the_rank(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 100)
    cfg = resolve(load_config(None, ["model.dim=256", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                                     "parallel.tp=2", "deepspeed.config=zero3", "train.global_batch_size=8",
                                     "train.micro_batch_size=4", f"data.paths=[{text}]"]), 4)
    layer = max(map(sum, layers_param_numels(cfg.model, 2)))
    zero = compose(cfg)["zero_optimization"]
    assert {k: v for k, v in load_recipe("zero3")["zero_optimization"].items() if v == "auto"}.keys() == LAYER_SIZED.keys()
    assert {k: zero[k] for k in LAYER_SIZED} == {k: n * layer for k, n in LAYER_SIZED.items()}
    assert est.recipe_facts("zero3").reduce_bucket is None  # resolved per model by the estimate


def test_planner_counts_layer_sized_buckets(monkeypatch):
    w = est.Workload(PRESETS["7B"], 4096, 256)
    cluster = Cluster(2, 8, GPUS["A100-80"], 300e9, 200e9)
    c = est.Candidate(2, 1, 8, "zero3", 1, "selective", True)
    auto = est.estimate(w, c, cluster).buffers
    layer = max(map(sum, layers_param_numels(w.model, 2)))
    real = est.recipe_facts("zero3")
    monkeypatch.setattr(est, "recipe_facts", lambda n: dataclasses.replace(real, reduce_bucket=layer, prefetch_bucket=layer))
    assert est.estimate(w, c, cluster).buffers == auto
    monkeypatch.setattr(est, "recipe_facts", lambda n: dataclasses.replace(real, reduce_bucket=2 * layer, prefetch_bucket=layer))
    assert est.estimate(w, c, cluster).buffers > auto
