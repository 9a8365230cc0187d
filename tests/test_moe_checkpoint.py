"""MoE checkpoints reshard across expert-parallel sizes: a run saved at EP=2 continues at EP=1 and EP=4
(weights, Adam moments and data position), into a pipeline (EP=2 × PP=2), and back from EP=1 to EP=2, with
the losses of continuing unchanged (checkpoint files hold all experts, gathered over EP; each rank loads its own);
exported as transformers' Mixtral, it gives the run's loss."""
import pytest

from megadeep.checkpoint.hf import export_hf
from tests.helpers import rel_err, write_text
from tests.test_checkpoint_train import launch

TOL = 1e-5
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_dim=64", "model.moe.z_loss_coef=0.001",
       "model.moe.aux_loss_coef=0.02", "train.steps=10"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "text.txt")


def test_expert_parallel_reshard(text, tmp_path):
    src_dir, ep1_dir = tmp_path / "src", tmp_path / "ep1"
    step5 = src_dir / "step_00000005"
    results, _ = launch(tmp_path, "moe", 4, text, [
        # the source: (TP, EP, DP) = (1, 2, 4), ZeRO 1, saving at step 5; its steps 6-10 are the reference
        {"name": "src", "overrides": MOE + ["parallel.ep=2", "deepspeed.config=zero1",
                                            f"checkpoint.dir={src_dir}", "checkpoint.save_every=5"]},
        {"name": "ep1", "overrides": MOE + ["parallel.ep=1", "deepspeed.config=zero2", f"checkpoint.resume={step5}",
                                            f"checkpoint.dir={ep1_dir}", "checkpoint.save_every=7"]},
        {"name": "ep4", "overrides": MOE + ["parallel.ep=4", "deepspeed.config=zero0", f"checkpoint.resume={step5}"]},
        {"name": "back", "overrides": MOE + ["parallel.ep=2", "deepspeed.config=zero1",
                                             f"checkpoint.resume={ep1_dir / 'step_00000007'}"]},
        {"name": "pp2", "overrides": MOE + ["parallel.ep=2", "parallel.pp=2", "deepspeed.config=zero1",
                                            f"checkpoint.resume={step5}"]},
    ])
    ref = results["src"]["loss"][5:]
    for name, start in (("ep1", 5), ("ep4", 5), ("back", 7), ("pp2", 5)):
        r = results[name]
        assert r["start"] == start and r["steps"] == list(range(start + 1, 11)), (name, r)
        err = rel_err(r["loss"], ref[start - 5:])
        print(f"EP=2 -> {name}: loss rel err {err:.2e}")
        assert err < TOL, (name, r["loss"], ref)

    # the EP=2 checkpoint exported as Mixtral: transformers' loss on step 6's batch is the run's
    hf_loss = mixtral_loss(export_hf(step5, tmp_path / "hf"), text, consumed=5 * 8)
    err = rel_err([hf_loss], [ref[0]])
    print(f"EP=2 checkpoint -> MixtralForCausalLM: step 6 loss rel err {err:.2e}")
    assert err < TOL


def mixtral_loss(folder, text, consumed: int) -> float:
    import torch
    from transformers import MixtralForCausalLM

    from megadeep.config import load_config, resolve
    from megadeep.data.loader import Loader, build_split
    from tests.workers.ckpt import TINY

    cfg = resolve(load_config(None, TINY + MOE + [f"data.paths=[{text}]"]), 1)
    tokens, targets = next(Loader(build_split(cfg).train, cfg.train.global_batch_size, 0, 1, cfg.train.seed, consumed))
    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
