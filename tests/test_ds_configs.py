"""Every shipped DeepSpeed recipe (and precision) trains on 2 CPU processes with a falling loss, and
the per-rank bytes of parameters, gradients and optimizer states match the ZeRO paper's formulas
(megadeep.planner.memory) at DP=2 and DP=4.

Launches dominate the time, so one 2-process launch trains every recipe and one 4-process launch
measures ZeRO 0-3 (and TP=2) at DP=4 (tests/workers/ds_configs.py).
"""
import json

import pytest

from megadeep.config import load_config, resolve
from megadeep.config.deepspeed import available_recipes, compose, load_recipe, zero_stage
from tests.helpers import read_json, run_torchrun, write_text

MIB = 1024**2
# A model whose attention matrices (256×256) are below ZeRO-3's persistence threshold (1e5) and
# MLP/embedding matrices above it, so stage 3 shows both behaviours.
BASE = """
model: {vocab_size: 512, dim: 256, n_layers: 4, n_heads: 4, ffn_dim: 768, max_seq_len: 32}
train: {seq_len: 32, micro_batch_size: 2, global_batch_size: %d, steps: 3}
optim: {lr: 0.003, warmup_steps: 1}
log: {progress: false}
"""
# bf16 matmuls are ~60x slower than fp32 on this CPU: a shorter sequence and two steps
BF16 = "train.precision=bf16,train.steps=2,train.seq_len=16,train.micro_batch_size=1,train.global_batch_size=4"
RUN_RECIPES = [r for r in available_recipes() if r != "zero3_nvme"]


def fp16_unsupported_reason() -> str:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        return ("DeepSpeed's CPU accelerator refuses fp16 on this CPU (torch.ops.mkldnn._is_mkldnn_fp16_supported() "
                "is False without AVX512-FP16/AMX): 'Type fp16 is not supported on your device'")
    return ""


def nvme_unavailable_reason() -> str:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        return "DeepSpeed's async-I/O op cannot build: install libaio-dev (scripts/system-deps.sh does, as root)"
    return ""


@pytest.mark.parametrize("recipe", available_recipes())
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_recipe_composes_into_a_valid_deepspeed_config(recipe, precision):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = resolve(load_config(None, ["data.corpus=shakespeare", f"deepspeed.config={recipe}", "deepspeed.nvme_path=/tmp/nvme",
                                     f"train.precision={precision}"]), 1)
    ds = DeepSpeedConfig(compose(cfg))  # DeepSpeed's own parser: unknown zero/offload keys raise
    assert ds.zero_config.stage == zero_stage(load_recipe(recipe))
    assert ds.float16_config.enabled == (precision == "fp16") and ds.bfloat16_config.enabled == (precision == "bf16")
    if precision == "fp16":
        assert ds.float16_config.loss_scale == 0  # dynamic loss scaling
    zero = load_recipe(recipe)["zero_optimization"]
    for block in ("offload_optimizer", "offload_param"):
        if block in zero:  # 0.19.5 changed pin_memory's default: recipes say what they mean
            assert "pin_memory" in zero[block]
            nvme = getattr(ds.zero_config, block).nvme_path
            assert (str(nvme) if nvme else None) == (None if zero[block]["device"] == "cpu" else "/tmp/nvme")


def test_nvme_recipe_uses_the_aio_keys_deepspeed_reads():
    aio = load_recipe("zero3_nvme")["aio"]
    assert "intra_op_parallelism" in aio and "thread_count" not in aio  # 0.19 ignores thread_count


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "text.txt")


def base_yaml(tmp_path, text, global_batch: int):
    path = tmp_path / "base.yaml"
    path.write_text(BASE % global_batch + f"data: {{paths: [{text}]}}\n")
    return path


@pytest.fixture(scope="module")
def dp2(text, tmp_path_factory):
    """One 2-process launch: every recipe in fp32 (3 steps) and ZeRO 0-3 in bf16 (2 steps)."""
    tmp = tmp_path_factory.mktemp("dp2")
    specs = [f"deepspeed.config={r}" for r in RUN_RECIPES]
    skipped = {"zero3_nvme": nvme_unavailable_reason(), "fp16": fp16_unsupported_reason()}
    if not skipped["zero3_nvme"]:
        specs.append(f"deepspeed.config=zero3_nvme,deepspeed.nvme_path={tmp / 'nvme'}")
    specs += [f"deepspeed.config=zero{s},{BF16}" for s in range(4)]
    if not skipped["fp16"]:
        specs += [f"deepspeed.config=zero{s},{BF16.replace('bf16', 'fp16')}" for s in (1, 3)]
    (tmp / "nvme").mkdir()
    out = tmp / "results.json"
    # accumulation 2 (global 8 = micro 2 × 2 × DP 2): memory is measured while gradients accumulate
    run_torchrun("ds_configs.py", 2, str(out), str(base_yaml(tmp, text, 8)), *specs, timeout=900)
    return read_json(out), skipped


def results_for(results, recipe, precision="fp32"):
    for spec, r in results.items():
        kv = dict(item.split("=", 1) for item in spec.split(","))
        if kv["deepspeed.config"] == recipe and kv.get("train.precision", "fp32") == precision:
            return r
    raise KeyError((recipe, precision))


@pytest.mark.parametrize("recipe", available_recipes())
def test_recipe_trains_on_two_cpu_processes(recipe, dp2):
    results, skipped = dp2
    if recipe == "zero3_nvme" and skipped["zero3_nvme"]:
        pytest.skip(skipped["zero3_nvme"])
    r = results_for(results, recipe)
    losses = r["loss"]
    assert len(losses) == 3 and all(map(lambda x: x == x and abs(x) < 1e4, losses)), losses
    assert losses[-1] < losses[0] - 0.5, losses
    offloaded = "offload" in recipe or "nvme" in recipe
    assert r["adam"] == ("DeepSpeedCPUAdam" if offloaded else "torch AdamW (fused)")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision, dp2):
    results, skipped = dp2
    if precision == "fp16" and skipped["fp16"]:
        pytest.skip(skipped["fp16"])
    for stage in ((0, 1, 2, 3) if precision == "bf16" else (1, 3)):
        losses = results_for(results, f"zero{stage}", precision)["loss"]
        assert losses[1] < losses[0], (stage, losses)


def assert_matches_formula(rows, stage: int, label: str):
    """Measured bytes vs megadeep.planner.memory.model_states, per rank. Tolerances:
    - params and optimizer states: 1% (DeepSpeed pads its flat partitions to an alignment);
    - gradients at stage 2: DeepSpeed keeps whole the gradients of the parameters overlapping the
      rank's partition, so a rank may hold up to two boundary parameters more than Ψ/N_d;
    - the total of the three (the planner's model-state prediction): 10%.
    """
    for r in rows:
        e = r["expected"]
        where = f"{label} rank {r['rank']}: measured {json.dumps({c: round(r[c] / MIB, 2) for c in e})} MiB, " \
                f"formula {json.dumps({c: round(v / MIB, 2) for c, v in e.items()})} MiB"
        assert abs(r["params"] - e["params"]) <= 0.01 * e["params"], where
        assert abs(r["optimizer"] - e["optimizer"]) <= 0.01 * e["optimizer"], where
        slack = 2 * r["largest_param_bytes"] if stage == 2 else 0.01 * e["grads"]
        assert -0.01 * e["grads"] <= r["grads"] - e["grads"] <= slack, where
        measured, formula = r["params"] + r["grads"] + r["optimizer"], sum(e.values())
        assert abs(measured - formula) <= 0.10 * formula, where


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_matches_zero_formula_dp2(stage, precision, dp2):
    rows = results_for(dp2[0], f"zero{stage}", precision)["memory"]
    assert len(rows) == 2
    assert_matches_formula(rows, stage, f"zero{stage} {precision} DP=2")


def test_zero3_fp32_master_is_the_parameter_partition(dp2):
    """megadeep.training.ds_fixes: fp32 ZeRO-3 updates the parameters' own flat partition (DeepSpeed
    0.19.8 would clone it: a str-vs-torch.device comparison), and the formula's 8 B/param of optimizer
    states (test_memory_matches_zero_formula_dp2) is what it then holds; bf16 keeps its fp32 master."""
    assert all(r["master_shares_params"] for r in results_for(dp2[0], "zero3")["memory"])
    assert not any(r["master_shares_params"] for r in results_for(dp2[0], "zero3", "bf16")["memory"])


def memory_on_4_ranks(text, tmp_path, specs: list[str]) -> dict:
    """Train ``specs`` (each naming deepspeed.config=zeroN) on 4 ranks; every rank's measured model
    states match the formula. Returns the results by spec."""
    out = tmp_path / "results.json"
    run_torchrun("ds_configs.py", 4, str(out), str(base_yaml(tmp_path, text, 16)), *specs, timeout=900)
    results = read_json(out)
    for spec in specs:
        rows = results[spec]["memory"]
        assert len(rows) == 4
        stage = int(spec.split("deepspeed.config=zero")[1][0])
        assert_matches_formula(rows, stage, spec)
    return results


def test_memory_matches_zero_formula_dp4(text, tmp_path):
    specs = [f"deepspeed.config=zero{s},train.steps=2" for s in range(4)]
    specs.append("deepspeed.config=zero2,train.steps=2,parallel.tp=2")  # TP=2 × DP=2: TP-local parameter counts
    results = memory_on_4_ranks(text, tmp_path, specs)
    # ZeRO really partitions: stage 3 holds less than stage 0 on every rank
    totals = [sum(r[c] for c in ("params", "grads", "optimizer")) for r in results[specs[3]]["memory"]]
    assert max(totals) < 0.5 * sum(results[specs[0]]["memory"][0][c] for c in ("params", "grads", "optimizer"))


def test_memory_command_prints_the_table(text, tmp_path):
    """``megadeep memory`` end to end on one process (ZeRO-1; DP=1 keeps everything whole)."""
    import subprocess
    import sys

    out = tmp_path / "memory.json"
    cmd = [sys.executable, "-m", "megadeep", "memory", str(base_yaml(tmp_path, text, 4)), "deepspeed.config=zero1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model states per rank" in proc.stdout and "formula" in proc.stdout
    (row,) = read_json(out)
    assert_matches_formula([row], 1, "megadeep memory zero1 DP=1")
