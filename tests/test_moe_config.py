"""MoE settings that cannot run: one line, exit 2, before any process starts; the MoE tiny config resolves."""
import subprocess
import sys

import pytest

from megadeep.cli import main
from megadeep.config import load_config, resolve
from tests.helpers import ROOT

TINY_MOE = str(ROOT / "configs" / "tiny-moe.yaml")

INVALID = [
    (["model.moe.num_experts=6"], 4, "parallel.ep=4 does not divide model.moe.num_experts=6"),
    (["parallel.tp=2"], 4, "parallel.ep=4 does not divide the data-parallel size 2"),
    (["model.moe.top_k=9"], 4, "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    (["model.moe.top_k=0"], 4, "model.moe.top_k=0 must be between 1"),
    (["parallel.pp=8"], 8, "more pipeline stages than model.n_layers"),
    (["parallel.pp=2", "deepspeed.config=zero2", "parallel.ep=2"], 4, "ZeRO stage 2"),
    (["model.moe.num_experts=0"], 4, "parallel.ep=4 needs an MoE model"),
    (["deepspeed.config=zero3"], 4, "model.moe cannot run with ZeRO stage 3"),
    (["model.moe.capacity_factor=-1"], 4, "model.moe.capacity_factor must be ≥ 0"),
    (["model.moe.every=5"], 4, "model.moe.every=5 must be between 1 and model.n_layers=4"),
    (["parallel.ep=0"], 4, "parallel.ep must be ≥ 1"),
    (["parallel.tp=2", "parallel.ep=2", "model.moe.ffn_dim=191"], 4, "expert FFN width 191 is not divisible by parallel.tp=2"),
]


@pytest.mark.parametrize("overrides,nproc,fragment", INVALID)
def test_invalid_moe_config_is_one_line_exit_2(overrides, nproc, fragment, capsys):
    code = main(["train", TINY_MOE, *overrides, "--nproc", str(nproc)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("megadeep: error: "), err
    assert fragment in err, err


def test_fails_before_spawning():
    proc = subprocess.run([sys.executable, "-m", "megadeep", "train", TINY_MOE, "model.moe.num_experts=6", "--nproc", "4"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "torch.distributed" not in proc.stdout + proc.stderr


def test_tiny_moe_config_resolves_for_4_processes():
    cfg = resolve(load_config(TINY_MOE), 4, require_data=False)
    assert (cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.dp) == (1, 4, 4)
    assert cfg.model.moe.num_experts == 8 and cfg.model.moe.top_k == 2
