"""Expert parallelism trains the single-process MoE model: every (TP, EP, DP, PP) layout × ZeRO 0/1/2 gives the
same per-step loss, grad norm, router losses and per-expert load fractions over 10 steps (dropless routing;
and with a capacity that drops tokens, the same dropped fraction too).

One launch per world size runs all of its layouts in turn (launches dominate test time).
"""
import pytest

from megadeep.parallel.layout import Layout
from tests.helpers import rel_err, run_parity, write_text

TOL = 1e-5
MOE = "moe=4,warmup=5"
CAP = "cap=1.0"  # capacity ceil(1.0·T·k/E): drops whatever an expert gets above its even share


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "text.txt")


@pytest.fixture(scope="module")
def references(text, tmp_path_factory):
    specs = [f"{MOE},zero=0", f"{MOE},zero=0,{CAP}"]
    results = run_parity(tmp_path_factory.mktemp("ref") / "ref.json", text, specs)
    return {"dropless": results[specs[0]], "capacity": results[specs[1]]}


@pytest.fixture(scope="module")
def reference(references):
    return references["dropless"]


def router_metrics(result, key):
    return [m[key] for m in result["moe"]]


def assert_matches(results, references):
    for spec, r in results.items():
        ref = references["capacity" if CAP in spec else "dropless"]
        assert len(r["loss"]) == len(ref["loss"]) == 10
        assert rel_err(r["loss"], ref["loss"]) < TOL, (spec, r["loss"], ref["loss"])
        assert rel_err(r["grad_norm"], ref["grad_norm"]) < TOL, (spec, r["grad_norm"], ref["grad_norm"])
        for key in ("aux_loss", "z_loss"):
            assert rel_err(router_metrics(r, key), router_metrics(ref, key)) < TOL, (spec, key)
        loads = [[m["load"][e] for e in sorted(m["load"])] for m in r["moe"]]
        ref_loads = [[m["load"][e] for e in sorted(m["load"])] for m in ref["moe"]]
        assert rel_err(loads, ref_loads) < TOL, (spec, loads, ref_loads)
        dropped = router_metrics(r, "dropped_fraction")
        assert rel_err(dropped, router_metrics(ref, "dropped_fraction")) < TOL, (spec, dropped)
        assert (min(dropped) > 0.01) if CAP in spec else dropped == [0.0] * 10, (spec, dropped)


def test_reference_learns_and_routes(reference):
    assert reference["loss"][-1] < reference["loss"][0] - 0.5
    for m in reference["moe"]:  # every expert gets tokens, and the fractions are fractions
        assert abs(sum(m["load"].values()) - 1.0) < 1e-9 and min(m["load"].values()) > 0
        assert m["aux_loss"] >= 1.0 - 1e-6  # E·Σ f·P is 1 at perfect balance and larger otherwise


@pytest.mark.parametrize("world,specs", [
    # (TP, EP, DP, PP) = (1, 2, 2, 1)
    (2, ["ep=2,zero=0", "ep=2,zero=1", "ep=2,zero=2", f"ep=2,zero=1,{CAP}", "ep=2,zero=1,ckpt"]),
    # (2, 2, 2, 1), (1, 4, 4, 1), (1, 2, 4, 1): expert grads averaged over an expert-data-parallel pair,
    # and (1, 2, 2, 2) with the pipeline engine (ZeRO 0/1 only there)
    (4, ["tp=2,ep=2,zero=0", "tp=2,ep=2,zero=1", "tp=2,ep=2,zero=2", "ep=4,zero=0", "ep=4,zero=1",
         "ep=4,zero=2", "ep=2,zero=1", "ep=2,zero=2", "ep=2,pp=2,zero=0", "ep=2,pp=2,zero=1"]),
])
def test_expert_parallel_layouts_match_single_process(world, specs, text, references, tmp_path):
    results = run_parity(tmp_path / "results.json", text, [f"{MOE},{s}" for s in specs], world)
    assert_matches(results, references)


def test_expert_groups_subdivide_data_parallel():
    layout = Layout(tp=2, dp=4, pp=2, ep=2)  # rank = tp + 2·dp + 8·pp
    assert layout.ep_groups()[:3] == [[0, 2], [1, 3], [4, 6]]
    assert layout.expert_dp_groups()[:3] == [[0, 4], [1, 5], [2, 6]]
    assert [layout.ep_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    for g in (layout.ep_groups, layout.expert_dp_groups):  # each a partition of the world
        assert sorted(r for ranks in g() for r in ranks) == list(range(layout.world_size))
