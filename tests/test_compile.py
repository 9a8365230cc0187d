"""train.compile (torch.compile per transformer block) trains the eager model: same per-step loss and
grad norm at TP=1 and TP=2 (fp32), so the option can be turned on for speed alone. One single-process
launch (eager reference + compiled) and one 2-rank launch (TP=2 compiled)."""
import pytest

from megadeep.config import load_config, resolve
from megadeep.errors import ConfigError

from tests.helpers import rel_err, run_parity, write_text

TOL = 1e-5
EAGER, COMPILED, TP2 = "zero=0,warmup=5", "zero=0,warmup=5,compile", "tp=2,zero=1,warmup=5,compile"


def test_compiled_blocks_train_like_eager_at_tp1_and_tp2(tmp_path):
    text = write_text(tmp_path / "text.txt")
    # compiled first: its blocks compile with the process's RoPE table cache still empty
    one = run_parity(tmp_path / "one.json", text, [COMPILED, EAGER])
    two = run_parity(tmp_path / "two.json", text, [TP2], nproc=2)
    ref = one[EAGER]
    assert ref["compiled_graphs"] == 0
    # all blocks share one graph for training and one for evaluation (no_grad): no break, no other recompile
    for got in (one[COMPILED], two[TP2]):
        assert got["compiled_graphs"] == 2 and got["graph_breaks"] == 0, got
    for got in (one[COMPILED], two[TP2]):
        assert len(got["loss"]) == len(ref["loss"]) == 10
        assert rel_err(got["loss"], ref["loss"]) < TOL, (got["loss"], ref["loss"])
        assert rel_err(got["grad_norm"], ref["grad_norm"]) < TOL, (got["grad_norm"], ref["grad_norm"])


def test_compile_with_pipeline_or_zero3_is_refused_in_one_line():
    for extra in (["parallel.pp=2"], ["deepspeed.config=zero3"]):
        with pytest.raises(ConfigError, match="train.compile=true needs parallel.pp=1 and ZeRO ≤ 2"):
            resolve(load_config(None, ["train.compile=true", "model.n_layers=2", *extra]), 2, require_data=False)
