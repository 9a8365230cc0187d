"""megadeep.model.accounting against the model it accounts for: per-rank parameter tensors of a
built model at TP 1/2/4, the pipeline specs at PP 2, and MFU computed by the
trainer's metrics and by the planner from the same step time."""
import pytest
import torch

from megadeep.config import load_config, resolve
from megadeep.config.schema import ModelConfig
from megadeep.model import Transformer, accounting, num_params
from megadeep.monitoring.metrics_log import MetricsLog
from megadeep.parallel import groups
from megadeep.pipeline import partition
from megadeep.planner.estimate import Candidate, Workload, estimate
from megadeep.planner.hardware import GPUS, Cluster

SHAPES = {
    "tied-gqa": ModelConfig(vocab_size=1000, dim=64, n_layers=3, n_heads=8, n_kv_heads=4, ffn_dim=160, vocab_pad_unit=8),
    "untied-mha": ModelConfig(vocab_size=999, dim=96, n_layers=2, n_heads=4, ffn_dim=256, tie_embeddings=False),
}


@pytest.fixture
def tp_rank(monkeypatch):
    """Build layers as rank 0 of a TP group of the given size (on the meta device: shapes only)."""
    def set_tp(tp):
        monkeypatch.setattr(groups, "get_tensor_model_parallel_world_size", lambda: tp)
        monkeypatch.setattr(groups, "get_tensor_model_parallel_rank", lambda: 0)
    return set_tp


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_rank_tensors_are_the_built_models(name, tp, tp_rank):
    m = SHAPES[name]
    tp_rank(tp)
    with torch.device("meta"):
        model = Transformer(m, sequence_parallel=tp > 1)
    built = sorted(p.numel() for p in model.parameters())
    assert sorted(partition.stage_param_numels(m, tp, 1)[0]) == built
    assert partition.stage_params(m, tp, 1) == [sum(built)]
    if tp == 1:  # the model's count: unpadded vocabulary
        padding = (m.padded_vocab(1) - m.vocab_size) * m.dim * (1 if m.tie_embeddings else 2)
        assert num_params(m) == sum(built) - padding


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_stages_hold_the_built_specs(name, tp, tp_rank):
    """PP 2: each spec of pipeline/stages.py, built as DeepSpeed's PipelineModule builds it, has the
    accounting's size; the stages megadeep's partition cuts hold every built tensor (plus the tied
    head's copy)."""
    from megadeep.pipeline.stages import layer_specs

    m = SHAPES[name]
    tp_rank(tp)
    specs, _ = layer_specs(m, tp > 1)
    with torch.device("meta"):
        built = [[p.numel() for p in spec.build().parameters()] for spec in specs]
    assert accounting.spec_param_numels(m, tp) == [sum(b) for b in built]
    for method in ("parameters", "type:Block", "uniform"):
        parts = partition.stage_bounds(m, tp, 2, method)
        stages = partition.stage_param_numels(m, tp, 2, method)
        assert [sorted(t) for t in stages] == [sorted(n for b in built[parts[s]:parts[s + 1]] for n in b) for s in range(2)]
        assert sum(partition.stage_layers(m, tp, 2, method)) == m.n_layers


def test_trainer_and_planner_mfu_are_one_formula():
    """The MFU the trainer logs for a step time and the MFU the planner predicts with that step time:
    the same model FLOPs per token (accounting.flops_per_token) over the same peak."""
    cfg = resolve(load_config(None, ["model.vocab_size=32000", "model.dim=512", "model.n_layers=4", "model.n_heads=8",
                                     "model.max_seq_len=1024", "train.seq_len=1024", "train.micro_batch_size=2",
                                     "train.global_batch_size=64", "data.corpus=shakespeare"]), 8)
    gpu = GPUS["A100-80"]
    w = Workload(cfg.model, cfg.train.seq_len, cfg.train.global_batch_size, "bf16")
    e = estimate(w, Candidate(1, 1, 8, "zero1", 2, "selective"), Cluster(1, 8, gpu, gpu.nvlink, gpu.network))
    log = MetricsLog(cfg, 8, gpu.peak("bf16"), enabled=False)
    record = log.step({"step": 1, "loss": 1.0, "lr": 1e-4,
                       "tokens_per_s": cfg.train.global_batch_size * cfg.train.seq_len / e.step_s})
    assert record["mfu"] == pytest.approx(e.mfu, rel=1e-12)
    assert log.flops_per_token == accounting.flops_per_token(cfg.model, cfg.train.seq_len)
