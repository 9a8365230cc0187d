"""The planner's formulas and its predictions against published large runs.

Memory: the per-layer activation formula must reduce to Korthikanti et al. 2022 for GPT's block;
model-state predictions are checked against bytes measured on CPU runs in tests/test_ds_configs.py
(the same megadeep.planner.memory.model_states).

Throughput, sources (all A100-80GB DGX nodes of Selene, 8 GPUs/node, NVLink + 8×200 Gb/s HDR IB,
mixed precision, sequence 2048, vocabulary 51,200, full activation recomputation):
- NVIDIA/Megatron-LM README, "GPT-3 Example" (examples/pretrain_gpt3_175B.sh: TP 8, PP 16,
  micro-batch 1, global batch 1536, --checkpoint-activations): "With full global batch size of 1536 on
  1024 A100 GPUs, each iteration takes around 32 seconds resulting in 138 teraFLOPs per GPU".
- Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM" (SC21, arXiv:2104.04473), Table 1 (weak scaling), the rows without pipelining
  (1.7B-18.4B; micro-batch size not given, which the model without a pipeline does not depend on).
- Same paper, Table 2, "PTD Parallelism" rows: 174.6B, model-parallel size 96 (read as TP 8 × PP 12),
  micro-batch 1, global batch 1536, on 384 / 768 / 1536 GPUs.
FLOPs are counted as the paper does (eq. 3). The same constants serve every row (estimate.py).
"""
import json

import pytest

from megadeep.cli import main
from megadeep.config import load_config, resolve
from megadeep.config.deepspeed import compose
from megadeep.config.schema import ModelConfig
from megadeep.planner.estimate import Candidate, Workload, estimate
from megadeep.planner.hardware import GPUS, Cluster
from megadeep.model.llama import Block
from megadeep.planner.memory import ActivationShape, layer_activation_bytes, layer_param_numels, stage_param_numels
from megadeep.planner.search import PRESETS, plan
from megadeep.model import num_params


def gpt(h: int, layers: int, heads: int, **kw) -> ModelConfig:
    """GPT's shape as our model: a gated MLP of width 8h/3 has GPT's 12h² parameters (and FLOPs)."""
    return ModelConfig(vocab_size=51200, dim=h, n_layers=layers, n_heads=heads, ffn_dim=8 * h // 3,
                       max_seq_len=2048, vocab_pad_unit=1, **kw)


@pytest.mark.parametrize("t", [1, 2, 8])
def test_activation_formula_is_korthikanti_for_gpt(t):
    s, b, h, a = 2048, 2, 12288, 96
    m = ModelConfig(dim=h, n_heads=a, ffn_dim=4 * h, dropout=0.1, attention_dropout=0.1, max_seq_len=s)
    shape = dict(seq=s, micro_batch=b, model=m, tp=t, flash=False, gated_mlp=False, act_bytes=2)
    sbh = s * b * h
    no_sp = layer_activation_bytes(ActivationShape(**shape), "none")
    sp = layer_activation_bytes(ActivationShape(**shape, sequence_parallel=True), "none")
    assert no_sp == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)), rel=1e-12)
    assert sp == pytest.approx(sbh / t * (34 + 5 * a * s / h), rel=1e-12)
    sel = layer_activation_bytes(ActivationShape(**shape, sequence_parallel=True), "selective")
    assert sel == pytest.approx(34 * sbh / t, rel=1e-12)
    full = layer_activation_bytes(ActivationShape(**shape, sequence_parallel=True), "full")
    assert full == pytest.approx(2 * sbh / t, rel=1e-12)


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_stage_parameters_add_up_to_the_model(size):
    m = PRESETS[size]
    padding = (m.padded_vocab(1) - m.vocab_size) * m.dim * (1 if m.tie_embeddings else 2)
    assert sum(stage_param_numels(m, 1, 1)[0]) == num_params(m) + padding
    for tp, pp in ((2, 1), (4, 4), (8, 2)):
        stages = stage_param_numels(m, tp, pp)
        assert len(stages) == pp and sum(map(len, stages)) >= m.n_layers * 6
    if m.tie_embeddings:  # with a pipeline the last stage holds its own copy of the tied embedding
        assert sum(map(sum, stage_param_numels(m, 1, 2))) == num_params(m) + padding + m.padded_vocab(1) * m.dim


def test_layer_tensor_sizes_are_the_models():
    """Tensor by tensor, not only in total: ZeRO-3 keeps tensors below its persistence threshold whole,
    so counting a fused weight (wqkv, w13) as its parts would mispredict stage-3 memory."""
    m = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=768)
    assert sorted(layer_param_numels(m, 1)) == sorted(p.numel() for p in Block(m, 0).parameters())


A100_SELENE = GPUS["A100-80"]
PUBLISHED = [  # name, (hidden, layers, heads), TP, PP, GPUs, global batch, micro-batch, TFLOP/s per GPU
    ("Megatron-LM README GPT-3 175B", (12288, 96, 96), 8, 16, 1024, 1536, 1, 138),
    ("Table 1 1.7B", (2304, 24, 24), 1, 1, 32, 512, 1, 137),
    ("Table 1 3.6B", (3072, 30, 32), 2, 1, 64, 512, 1, 138),
    ("Table 1 7.5B", (4096, 36, 32), 4, 1, 128, 512, 1, 142),
    ("Table 1 18.4B", (6144, 40, 48), 8, 1, 256, 1024, 1, 135),
    ("Table 2 PTD-P 174.6B, 384 GPUs", (12288, 96, 96), 8, 12, 384, 1536, 1, 153),
    ("Table 2 PTD-P 174.6B, 768 GPUs", (12288, 96, 96), 8, 12, 768, 1536, 1, 149),
    ("Table 2 PTD-P 174.6B, 1536 GPUs", (12288, 96, 96), 8, 12, 1536, 1536, 1, 141),
]


def predict(shape, tp, pp, gpus, batch, micro):
    cluster = Cluster(gpus // 8, 8, A100_SELENE, A100_SELENE.nvlink, A100_SELENE.network)
    # Megatron of 2021: plain data parallelism (ZeRO 0), its own attention kernels (no flash),
    # the scatter/gather pipeline sends; our model of its schedule is the non-interleaved 1F1B
    c = Candidate(tp, pp, gpus // (tp * pp), "zero0", micro, "full", scatter_gather=True)
    return estimate(Workload(gpt(*shape), 2048, batch, "bf16", flash=False), c, cluster)


@pytest.mark.parametrize("name,shape,tp,pp,gpus,batch,micro,published", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_predicted_throughput_of_published_runs(name, shape, tp, pp, gpus, batch, micro, published):
    e = predict(shape, tp, pp, gpus, batch, micro)
    assert abs(e.tflops_per_gpu - published) <= 0.15 * published, (name, e.tflops_per_gpu, published)
    assert e.memory <= A100_SELENE.memory  # the published layout fits where it ran


def test_readme_run_step_time():
    """The README's '32 seconds' per iteration, within the same ±15%."""
    e = predict((12288, 96, 96), 8, 16, 1024, 1536, 1)
    assert e.step_s == pytest.approx(32, rel=0.15)


def test_estimate_moves_the_right_way():
    w = Workload(PRESETS["7B"], 4096, 256)
    cluster = Cluster(2, 8, GPUS["A100-80"], 300e9, 200e9)
    base = Candidate(2, 1, 8, "zero1", 1, "selective", True)
    e = estimate(w, base, cluster)
    assert estimate(w, Candidate(2, 1, 8, "zero3", 1, "selective", True), cluster).states < e.states
    full = estimate(w, Candidate(2, 1, 8, "zero1", 1, "full", True), cluster)
    assert full.activations < e.activations and full.step_s > e.step_s
    offload = estimate(w, Candidate(2, 1, 8, "zero2_offload", 1, "selective", True), cluster)
    assert offload.states < e.states and offload.host > 0 and offload.offload_s > 0
    piped = estimate(w, Candidate(2, 4, 2, "zero1", 1, "selective", True), cluster)
    assert piped.bubble_s > 0 and e.bubble_s == 0


def test_plan_ranks_fitting_legal_layouts():
    w = Workload(PRESETS["7B"], 4096, 512)
    cluster = Cluster(4, 8, GPUS["A100-40"], 300e9, 200e9)
    from megadeep.config import RunConfig

    base = RunConfig()
    base.model = w.model
    result = plan(w, cluster, base)
    assert result.ranked and result.too_big and result.illegal
    steps = [e.step_s for e in result.ranked]
    assert steps == sorted(steps)
    for e in result.ranked:
        c = e.candidate
        assert e.memory <= GPUS["A100-40"].memory and c.tp * c.pp * c.dp == 32 and c.tp <= 8
        assert not (c.pp > 1 and c.recipe not in ("zero0", "zero1"))  # DeepSpeed's pipeline: ZeRO 0/1


def test_plan_command_writes_a_runnable_config(tmp_path, capsys):
    out = tmp_path / "plan"
    rc = main(["plan", "--size", "7B", "--seq-len", "4096", "--global-batch", "512", "--nodes", "4",
               "--gpu", "H100-80", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "layouts fit" in printed and "TFLOP/s" in printed
    assert "name the training data" in printed
    # what the table's #1 says, and legal for 4×8 GPUs once it names its data
    cfg = resolve(load_config(out / "run.yaml", ["data.corpus=shakespeare"]), 32)
    assert json.loads((out / "ds_config.json").read_text()) == json.loads(json.dumps(compose(cfg)))
    assert cfg.train.seq_len == 4096 and cfg.train.global_batch_size == 512 and cfg.train.precision == "bf16"


def test_plan_says_when_nothing_fits(capsys):
    rc = main(["plan", "--size", "gpt3-175B", "--seq-len", "2048", "--global-batch", "8", "--nodes", "1",
               "--gpus-per-node", "1", "--gpu", "A100-40"])
    assert rc == 2
    assert "no layout fits" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--size", "3B"], "not a preset"),
    ([], "give the model"),
    (["--size", "7B", "--seq-len", "8192"], "longer than model.max_seq_len"),
])
def test_plan_input_errors(argv, message, capsys):
    args = ["plan", "--seq-len", "4096", "--global-batch", "64", *argv]
    assert main(args) == 2
    assert message in capsys.readouterr().err
