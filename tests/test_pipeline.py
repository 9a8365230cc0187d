"""Pipeline parallelism on DeepSpeed's engine trains the single-process model, in every DP×TP×PP layout.

Specs are ``tests/workers/parity.py``'s; all use a 4-layer model so that 4 stages each get a block,
with a 5-step warmup: with the default 3 its step 6 has a gradient spike whose norm is so ill-conditioned
that ZeRO 0 and ZeRO 1 of the *same* single process differ by 6e-5 there. One launch per world size; the
8-rank layout with ZeRO 0 runs through ``megadeep train --nproc 8``.
"""
import json
import subprocess
import sys

import pytest

from megadeep.config import load_config, resolve
from megadeep.config.schema import ModelConfig
from megadeep.errors import ConfigError
from megadeep.pipeline.partition import describe, layer_names, stage_bounds
from tests.helpers import ROOT, rel_err, run_parity, write_text
from tests.workers.parity import TINY

TOL = 1e-5
TINY_YAML = str(ROOT / "configs" / "tiny.yaml")
L4 = "layers=4,warmup=5"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "text.txt")


@pytest.fixture(scope="module")
def reference(text, tmp_path_factory):
    """One process, no parallelism: the model every layout must reproduce."""
    specs = [f"{L4},zero=0", f"{L4},zero=1", f"{L4},zero=0,untied"]
    return run_parity(tmp_path_factory.mktemp("ref") / "ref.json", text, specs)


def ref_for(spec: str, reference: dict) -> dict:
    return reference[f"{L4},zero=0" + (",untied" if "untied" in spec else "")]


def assert_matches(results: dict, reference: dict) -> None:
    for spec, r in results.items():
        ref = ref_for(spec, reference)
        assert len(r["loss"]) == len(ref["loss"]) == 10, spec
        for key in ("loss", "grad_norm", "val_loss"):
            assert rel_err(r[key], ref[key]) < TOL, (spec, key, r[key], ref[key])
        # the tied embedding's copies on the first and last stage stay bitwise equal
        tied_stages = "pp=" in spec and "untied" not in spec
        assert r["tied_drift"] == (0.0 if tied_stages else None), (spec, r["tied_drift"])


def test_reference_learns_and_is_well_conditioned(reference):
    losses = reference[f"{L4},zero=0"]["loss"]
    assert losses[-1] < losses[0] - 0.5  # agreement below is agreement on learning, not on noise
    # rounding differences alone (another optimizer implementation) stay far below the tolerance
    assert_matches({"zero=1": reference[f"{L4},zero=1"]}, reference)


# (TP,PP,DP) ∈ {(1,2,1), (1,4,1), (2,2,1), (1,2,2), (2,2,2)} × ZeRO 0/1, plus: DeepSpeed checkpoint
# save → fresh engine → load mid-run (resume=4), uniform and per-block partitioning, sequence parallel with an
# untied head, dropout with and without per-stage activation checkpointing. (2,2,2) with ZeRO 0 is
# the CLI test below.
LAUNCHES = {
    2: ["pp=2,zero=0", "pp=2,zero=1,uniform"],
    4: ["pp=4,zero=0", "pp=4,zero=1,blocks", "tp=2,pp=2,zero=0", "tp=2,pp=2,zero=1,resume=4", "pp=2,zero=0",
        "pp=2,zero=1,resume=4", "tp=2,pp=2,zero=1,sp,untied", "tp=2,pp=2,zero=1,drop", "tp=2,pp=2,zero=1,drop,pckpt=1"],
    8: ["tp=2,pp=2,zero=1"],
}


@pytest.fixture(scope="module")
def launch(text, tmp_path_factory):
    """Results of a world size's one launch, by spec (without the common suffix)."""
    done = {}

    def results(world: int) -> dict:
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}") / "results.json"
            found = run_parity(out, text, [f"{s},{L4}" for s in LAUNCHES[world]], world)
            done[world] = {s.removesuffix(f",{L4}"): r for s, r in found.items()}
        return done[world]

    return results


@pytest.mark.parametrize("world", sorted(LAUNCHES))
def test_pipeline_layouts_match_single_process(world, launch, reference):
    assert_matches({s: r for s, r in launch(world).items() if "drop" not in s}, reference)


def test_pipeline_checkpointing_replays_dropout(launch):
    """Per-stage activation checkpointing recomputes with the same dropout masks (the TP streams too),
    so it changes nothing: the same run with and without it gives the same losses."""
    results = launch(4)
    plain, ckpt = results["tp=2,pp=2,zero=1,drop"], results["tp=2,pp=2,zero=1,drop,pckpt=1"]
    assert rel_err(ckpt["loss"], plain["loss"]) < TOL
    assert rel_err(ckpt["grad_norm"], plain["grad_norm"]) < TOL


def stages(m: ModelConfig, pp: int, method: str, tp: int = 1) -> list[str]:
    bounds, names = stage_bounds(m, tp, pp, method), layer_names(m)
    return [describe(names[bounds[s]:bounds[s + 1]]) for s in range(pp)]


def test_every_method_gives_every_stage_a_block():
    """The default (parameters) on the 4-stage layout users try first: DeepSpeed's own balancing gave
    stage 0 only the embedding (refused after launch); megadeep's keeps a block on every stage."""
    resolve(load_config(TINY_YAML, ["parallel.tp=1", "parallel.pp=4"]), 4)  # the layout passes the checks
    tiny = ModelConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384)
    assert stages(tiny, 4, "parameters") == ["tok_embeddings, layers.0", "layers.1", "layers.2",
                                             "layers.3, norm, output"]
    assert stages(tiny, 2, "parameters") == ["tok_embeddings, layers.0-1", "layers.2-3, norm, output"]
    for model in (tiny, ModelConfig(n_layers=7), ModelConfig(vocab_size=50000, n_layers=5, tie_embeddings=False)):
        for pp in range(1, model.n_layers + 1):
            for method in ("parameters", "uniform", "type:Block", "type:embed|block"):
                bounds = stage_bounds(model, 2, pp, method)
                assert bounds[0] == 0 and bounds[-1] == model.n_layers + 3 and len(bounds) == pp + 1
                assert all(any(n.startswith("layers.") for n in layer_names(model)[a:b])
                           for a, b in zip(bounds, bounds[1:])), (pp, method, bounds)
    # a huge untied vocabulary: the embedding and the head each weigh more than all blocks together, so
    # balancing by parameters gives them a stage of one block each and the middle stage the rest
    big = ModelConfig(vocab_size=50000, dim=128, n_layers=5)
    assert stages(big, 3, "parameters") == ["tok_embeddings, layers.0", "layers.1-3", "layers.4, norm, output"]
    assert stages(tiny, 3, "uniform") == ["tok_embeddings, layers.0", "layers.1", "layers.2-3, norm, output"]


@pytest.mark.parametrize("method, says", [("type:[", "is not a valid regex"), ("type:Conv", "matches no layer type"),
                                          ("balanced", "must be one of parameters, uniform")])
def test_bad_partition_methods_are_refused(method, says):
    with pytest.raises(ConfigError, match=says):
        stage_bounds(ModelConfig(n_layers=4), 1, 2, method)


def test_cli_trains_2x2x2_on_8_processes(text, reference, tmp_path):
    metrics, config = tmp_path / "metrics.jsonl", tmp_path / "run.yaml"
    config.write_text("name: pipeline-cli\n")  # everything else as in the reference, by overrides
    overrides = [*TINY, "log.progress=true", f"data.paths=[{text}]", "model.n_layers=4", "optim.warmup_steps=5",
                 "parallel.tp=2", "parallel.pp=2", "deepspeed.config=zero0", f"log.metrics_file={metrics}"]
    proc = subprocess.run([sys.executable, "-m", "megadeep", "train", str(config), *overrides, "--nproc", "8"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "layout TP=2 DP=2 PP=2" in proc.stdout
    assert "stage 0: tok_embeddings, layers.0-1\n  stage 1: layers.2-3, norm, output (tied to tok_embeddings)" \
        in proc.stdout, proc.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    ref = reference[f"{L4},zero=0"]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert rel_err([r["loss"] for r in steps], ref["loss"]) < TOL
    assert rel_err([r["grad_norm"] for r in steps], ref["grad_norm"]) < TOL
    assert rel_err([r["val_loss"] for r in records if "val_loss" in r], ref["val_loss"]) < TOL
