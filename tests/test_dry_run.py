"""``megadeep train CONFIG --dry-run``: any rank of the full-size run, built on the meta device, reported
with the planner's bytes. Covers the shipped reference configs and Llama-3.1-405B's shape at TP=8 PP=16."""
import os
import re
import subprocess
import sys

import pytest

from megadeep.config import load_config, resolve
from megadeep.errors import ConfigError
from megadeep.planner.memory import stage_param_numels
from megadeep.training.dry_run import describe, rank_modules
from megadeep.training.memory_cli import expected_states
from megadeep.training.run import resolve_run
from tests.helpers import ROOT

LLAMA_405B = ["model.dim=16384", "model.n_layers=126", "model.n_heads=128", "model.n_kv_heads=8",
              "model.ffn_dim=53248", "parallel.pp=16"]
CASES = [  # config, overrides, world size, ranks to check
    ("llama-1b", [], 8, [0, 7]),
    ("llama3-8b", [], 32, [0, 31]),
    ("llama3-70b", [], 512, [0, 200, 511]),
    ("llama3-70b", LLAMA_405B, 1024, [0, 8 * 8 * 1 + 5, 1023]),  # first, a 7-block stage, last
]
STATES = re.compile(r"params ([\d,]+) B, grads ([\d,]+) B, optimizer ([\d,]+) B")


def run_for(config: str, overrides: list[str], world: int):
    cfg = resolve(load_config(ROOT / "configs" / f"{config}.yaml", overrides), world, require_data=False)
    return resolve_run(cfg, "cuda")


@pytest.mark.parametrize("config,overrides,world,ranks", CASES, ids=["1b", "8b", "70b", "405b"])
def test_rank_bytes_equal_the_planner(config, overrides, world, ranks):
    run = run_for(config, overrides, world)
    p = run.cfg.parallel
    for rank in ranks:
        pp_rank = run.layout.coord(rank).pp
        modules, _ = rank_modules(run, rank)
        built = sum(q.numel() for mod in modules.values() for q in mod.parameters())
        assert built == sum(stage_param_numels(run.cfg.model, p.tp, p.pp, p.partition_method)[pp_rank]), (config, rank)
        assert all(q.device.type == "meta" for mod in modules.values() for q in mod.parameters())
        report = describe(run, rank)
        want = expected_states(run, pp_rank)
        assert STATES.search(report).groups() == tuple(f"{b:,.0f}" for b in (want.params, want.grads, want.optimizer))
        assert f"rank {rank} of {world}:" in report and f"cuda:{rank % 8}" in report and "nccl" in report


def test_405b_stage_map_and_tp_shard():
    run = run_for("llama3-70b", LLAMA_405B, 1024)
    _, first = rank_modules(run, 0)
    _, last = rank_modules(run, 1023)
    # 126 blocks on 16 stages: megadeep's cut gives the two lightest-loaded 7 (the embedding's stage first)
    assert first[0] == "tok_embeddings" and sum(n.startswith("layers.") for n in first) == 7
    assert last[-2:] == ["norm", "output"] and sum(n.startswith("layers.") for n in last) == 8
    modules, _ = rank_modules(run, 3)  # TP rank 3: an eighth of each split matrix
    wqkv = modules["layers.0"].attention.wqkv.weight
    assert tuple(wqkv.shape) == ((128 + 2 * 8) * 128 // 8, 16384)


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megadeep", "train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_dry_run_writes_nothing_and_refuses_a_layout_that_does_not_fit(tmp_path):
    ok = cli(str(ROOT / "configs/llama3-70b.yaml"), "--dry-run", "--world-size", "512", "--rank", "511", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "rank 511 of 512: TP 7/8, DP 7/8, PP 7/8" in ok.stdout and "layers.70" in ok.stdout
    assert list(tmp_path.iterdir()) == []
    # 70B data-parallel only: 16 bytes per parameter of model states on every GPU
    bad = cli(str(ROOT / "configs/llama3-70b.yaml"), "parallel.tp=1", "parallel.pp=1", "--dry-run",
              "--world-size", "8", "--rank", "5", cwd=tmp_path)
    err = [line for line in bad.stderr.splitlines() if "megadeep: error" in line]
    assert bad.returncode == 2 and len(err) == 1, bad.stderr
    assert re.search(r"rank 5 \(TP 0, DP 5, PP 0\) needs [\d,]+ bytes .* H100-80 has 80 GiB", err[0])


def test_rank_outside_the_world_is_refused():
    with pytest.raises(ConfigError, match="outside the world of 32"):
        describe(run_for("llama3-8b", [], 32), 32)
