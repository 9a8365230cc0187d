"""Context parallelism trains the single-process model: (TP, CP, DP, PP) layouts × ZeRO stages × the
Ulysses and all-gather-KV attentions, with GQA (TINY has 8 heads, 4 KV heads), within 1e-5 relative
loss and grad norm over 10 steps; with document masking too. One launch per world size."""
import pytest

from megadeep.parallel import context
from megadeep.parallel.layout import Layout
from tests.helpers import rel_err, run_parity, run_torchrun, write_text

TOL = 1e-5
WARM = "warmup=7"  # no gradient spike in the 10 steps, masked or not (cf. test_layout_parity)
PLAIN, DOCS = f"zero=0,{WARM}", f"zero=0,docpos,{WARM}"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "text.txt")


@pytest.fixture(scope="module")
def reference(text, tmp_path_factory):
    """One process: plain, and with document masking (lines are documents, RoPE restarts in each)."""
    return run_parity(tmp_path_factory.mktemp("ref") / "ref.json", text, [PLAIN, DOCS])


def test_zigzag_split_is_balanced_and_covers_the_sequence():
    layout = Layout(cp=4)
    seq, parts = 32, []
    for r in range(4):
        parts.append(context._zigzag(seq, 4, r).tolist())
    assert sorted(sum(parts, [])) == list(range(seq))
    causal_pairs = [sum(p + 1 for p in part) for part in parts]  # keys each rank's queries see
    assert len(set(causal_pairs)) == 1, causal_pairs  # zig-zag: the same attention work on every rank
    assert parts[0] == [0, 1, 2, 3, 28, 29, 30, 31]
    assert layout.cp_groups() == [[0, 1, 2, 3]]


def test_rank_map_tp_fastest_then_cp_dp_pp():
    layout = Layout(tp=2, dp=2, pp=2, cp=2)
    assert layout.world_size == 16
    assert layout.tp_groups()[:2] == [[0, 1], [2, 3]]
    assert layout.cp_groups()[:2] == [[0, 2], [1, 3]]
    assert layout.dp_groups()[:2] == [[0, 4], [1, 5]]
    assert layout.pp_groups()[0] == [0, 8]
    assert layout.dp_cp_groups()[0] == [0, 2, 4, 6]  # gradients are reduced over DP×CP
    for rank in range(16):
        c = layout.coord(rank)
        assert layout.rank(c.tp, c.dp, c.pp, layout.cp_index(rank)) == rank


def test_attention_choice():
    assert context.pick("auto", kv_heads_per_tp=4, cp=2) == "ulysses"
    assert context.pick("auto", kv_heads_per_tp=2, cp=4) == "allgather"  # Ulysses cannot split 2 KV heads 4 ways
    assert context.pick("allgather", kv_heads_per_tp=4, cp=2) == "allgather"


def assert_matches(results, reference):
    for spec, r in results.items():
        ref = reference[DOCS if "docpos" in spec else PLAIN]
        assert len(r["loss"]) == len(ref["loss"]) == 10
        assert rel_err(r["loss"], ref["loss"]) < TOL, (spec, r["loss"], ref["loss"])
        assert rel_err(r["grad_norm"], ref["grad_norm"]) < TOL, (spec, r["grad_norm"], ref["grad_norm"])


def test_document_masking_changes_training(reference):
    """The masked reference is a different model: agreement with it is not agreement with the plain one."""
    assert rel_err(reference[DOCS]["loss"], reference[PLAIN]["loss"]) > 1e-3


U, A = "cpa=ulysses", "cpa=allgather"


@pytest.mark.parametrize("world,specs", [
    (2, [f"cp=2,zero=0,{U}", f"cp=2,zero=1,{A}", f"cp=2,zero=0,docpos,{U}", f"cp=2,zero=3,docpos,{A}"]),
    (4, [f"cp=4,zero=0,{U}", f"cp=4,zero=1,{A}",                    # (1,4,1,1)
         f"tp=2,cp=2,zero=2,{U}", f"tp=2,cp=2,zero=1,sp,{A}",       # (2,2,1,1), + sequence parallel
         f"cp=2,zero=1,{U}", f"cp=2,zero=2,docpos,{A}",             # (1,2,2,1)
         f"pp=2,cp=2,zero=1,{U}", f"pp=2,cp=2,zero=1,{A}"]),        # (1,2,1,2)
    (8, [f"tp=2,cp=2,zero=3,{U}", f"tp=2,cp=2,zero=3,{A}"]),        # (2,2,2,1) + ZeRO-3
])
def test_context_parallel_matches_single_process(world, specs, text, reference, tmp_path):
    specs = [f"{s},{WARM}" for s in specs]
    assert_matches(run_parity(tmp_path / "results.json", text, specs, world), reference)


def test_checkpoint_resumes_across_cp_sizes(text, tmp_path):
    """A CP=2 run saved at step 5 continues at CP=1 (DP=4) and CP=4 with the losses it would have had."""
    from tests.test_checkpoint_train import launch

    src_dir, base = tmp_path / "src", ["train.steps=10", "deepspeed.config=zero1"]
    src, _ = launch(tmp_path, "src", 2, text, [
        {"name": "src", "overrides": base + ["parallel.cp=2", f"checkpoint.dir={src_dir}", "checkpoint.save_every=5"]}])
    step5 = src_dir / "step_00000005"
    results, _ = launch(tmp_path, "resume", 4, text, [
        {"name": f"cp{cp}", "overrides": base + [f"parallel.cp={cp}", f"checkpoint.resume={step5}"]} for cp in (1, 4)])
    ref = src["src"]["loss"][5:]
    for cp in (1, 4):
        r = results[f"cp{cp}"]
        assert r["start"] == 5 and r["steps"] == list(range(6, 11)), r
        assert rel_err(r["loss"], ref) < TOL, (cp, r["loss"], ref)


def test_dry_run_and_accounting_know_cp():
    """Activations fall by ~1/cp, ZeRO shards over DP×CP, and the attention traffic is reported."""
    import re

    from megadeep.training.dry_run import describe
    from tests.test_dry_run import run_for

    acts, texts = {}, {}
    for cp in (1, 2, 4):
        run = run_for("llama3-8b", [f"parallel.cp={cp}", "model.max_seq_len=8192", "train.seq_len=8192"], 32)
        texts[cp] = describe(run, 3)
        acts[cp] = int(re.search(r"activations \(peak[^:]*\): ([\d,]+) B", texts[cp]).group(1).replace(",", ""))
    assert 0.49 < acts[2] / acts[1] <= 0.5 and 0.24 < acts[4] / acts[1] <= 0.25, acts
    assert "CP 1/2 (ulysses)" in texts[2] and "CP 1/4 (ulysses)" in texts[4] and "CP " not in texts[1]
    assert "context parallel: ulysses attention receives" in texts[4]


def test_planner_knows_cp():
    """CP divides a layout's activations by cp and adds its attention traffic; at 64k tokens the best
    planned layout of a 7B model on 2×8 A100-80 is a CP one (each is a run config megadeep validates)."""
    import dataclasses

    from megadeep.config.schema import RunConfig
    from megadeep.planner.estimate import Candidate, Workload, estimate
    from megadeep.planner.hardware import GPUS, Cluster
    from megadeep.planner.search import PRESETS, plan

    gpu = GPUS["A100-80"]
    cluster = Cluster(2, 8, gpu, gpu.nvlink, gpu.network)
    w = Workload(dataclasses.replace(PRESETS["7B"], max_seq_len=65536), 65536, 16)
    base = estimate(w, Candidate(4, 1, 4, "zero1", 1, "full", True), cluster)
    for cp in (2, 4):
        e = estimate(w, Candidate(4, 1, 4 // cp, "zero1", 1, "full", True, cp=cp), cluster)
        assert abs(e.activations / base.activations - 1 / cp) < 0.01, (cp, e.activations, base.activations)
        assert e.tp_s > base.tp_s  # + the attention's all-to-alls
    best = plan(w, cluster, RunConfig(), cp_sizes=(1, 2, 4, 8)).ranked[0]
    assert best.candidate.cp > 1, best.candidate
    assert best.breakdown()["layout"]["cp"] == best.candidate.cp


def test_start_up_line_names_the_cp_attention():
    from megadeep.config import load_config, resolve
    from megadeep.training.run import resolve_run
    from tests.workers.parity import TINY

    def line(overrides, world):
        cfg = resolve(load_config(None, TINY + overrides), world, require_data=False)
        return resolve_run(cfg, "cpu").describe_cp

    assert line(["parallel.cp=2"], 2) == " CP=2 (ulysses)"
    assert line(["parallel.cp=4", "parallel.tp=2"], 8) == " CP=4 (allgather)"  # 2 KV heads per TP rank
    assert line(["parallel.cp=2", "parallel.cp_attention=allgather"], 2) == " CP=2 (allgather)"
    assert line([], 2) == ""
