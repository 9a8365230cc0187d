"""Which Adam a run gets, for every device / recipe / availability combination, and that DeepSpeed's
own dispatcher builds the class the log line names (no GPU needed: availability is monkeypatched)."""
import types

import pytest
import torch

from megadeep.config import load_config, resolve
from megadeep.config.deepspeed import compose
from megadeep.errors import ConfigError
from megadeep.training import optimizer as opt


class FakeApexAdam(torch.optim.Optimizer):
    def __init__(self, params, lr, betas, eps, weight_decay, adam_w_mode):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode


NEEDED = ["data.corpus=shakespeare"]  # resolve() wants some training data named


def ds_config(recipe: str, *overrides: str) -> dict:
    return compose(resolve(load_config(None, [*NEEDED, f"deepspeed.config={recipe}", *overrides]), 1))


@pytest.fixture
def apex(monkeypatch):
    """apex importable (with its CUDA extensions) or not."""
    def set_available(available: bool):
        monkeypatch.setattr(opt, "apex_fused_adam", lambda: FakeApexAdam if available else None)
    return set_available


@pytest.mark.parametrize("recipe,device,apex_ok,expected", [
    ("zero1", "cuda", True, "apex FusedAdam"),
    ("zero3", "cuda", True, "apex FusedAdam"),
    ("zero1", "cuda", False, "DeepSpeed FusedAdam"),
    ("zero2_offload", "cuda", True, "DeepSpeedCPUAdam"),
    ("zero3_offload_all", "cuda", False, "DeepSpeedCPUAdam"),
    ("zero3_nvme", "cuda", True, "DeepSpeedCPUAdam"),
    ("zero3_offload", "cpu", False, "DeepSpeedCPUAdam"),
    ("zero0", "cpu", True, "torch AdamW (fused)"),
    ("zero2", "cpu", False, "torch AdamW (fused)"),
])
def test_auto_choice(recipe, device, apex_ok, expected, apex):
    apex(apex_ok)
    cfg = ds_config(recipe, "deepspeed.nvme_path=/tmp/x")
    choice = opt.choose_adam(cfg, device)
    assert choice.name == expected
    if expected == "apex FusedAdam":
        assert "optimizer" not in cfg  # a client optimizer replaces DeepSpeed's
        p = torch.nn.Parameter(torch.zeros(2))
        built = choice.client([{"params": [p], "weight_decay": 0.1}])
        assert isinstance(built, FakeApexAdam) and built.adam_w_mode
        assert built.defaults["lr"] == 3e-4 and list(built.defaults["betas"]) == [0.9, 0.95]
    else:
        assert choice.client is None and cfg["optimizer"]["type"] == "AdamW"
        assert cfg["optimizer"]["params"].get("torch_adam", False) == (expected == "torch AdamW (fused)")


def deepspeed_builds(cfg: dict):
    """The class DeepSpeed's engine would construct from ``cfg``'s optimizer block (0.19: the
    engine's get_optimizer_configuration, called on a stand-in for the engine)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    offloaded = cfg["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
    engine = types.SimpleNamespace(zero_use_cpu_optimizer=lambda: offloaded, bf16_optimizer_states=lambda: False,
                                   zenflow=False)
    params = dict(cfg["optimizer"]["params"])
    cls, kwargs = DeepSpeedEngine.get_optimizer_configuration(engine, params, True)
    return cls, {**params, **kwargs}


@pytest.mark.parametrize("recipe,device,expected", [
    ("zero2_offload", "cuda", "DeepSpeedCPUAdam"),
    ("zero3_nvme", "cuda", "DeepSpeedCPUAdam"),
    ("zero1", "cuda", "FusedAdam"),
    ("zero3", "cpu", "AdamW"),
])
def test_deepspeed_builds_what_we_log(recipe, device, expected, apex):
    apex(False)
    cfg = ds_config(recipe, "deepspeed.nvme_path=/tmp/x")
    name = opt.choose_adam(cfg, device).name
    cls, kwargs = deepspeed_builds(cfg)
    assert cls.__name__ == expected, (name, cls)
    assert cls.__module__.startswith("torch.optim" if name.startswith("torch") else "deepspeed.ops")
    if name.startswith("torch"):  # the kwargs DeepSpeed passes build torch's fused kernel, not foreach
        built = cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
        assert built.defaults["fused"] is True and not built.defaults["foreach"]


@pytest.mark.parametrize("overrides,message", [
    (["deepspeed.config=zero2_offload", "deepspeed.optimizer=apex_fused"], "steps on the CPU"),
    (["deepspeed.config=zero3_offload", "deepspeed.optimizer=ds_fused"], "steps on the CPU"),
    (["deepspeed.config=zero1", "deepspeed.optimizer=ds_cpu_adam"], "needs an optimizer-offload recipe"),
    (["deepspeed.config=zero1", "deepspeed.optimizer=apex_fused", "train.device=cpu"], "CUDA kernel"),
    (["deepspeed.optimizer=lamb"], "must be one of"),
])
def test_impossible_choices_refused_before_launch(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(load_config(None, [*NEEDED, *overrides]), 1)


def test_explicit_choice_needs_what_it_names(apex):
    apex(False)
    with pytest.raises(ConfigError, match="apex built with --cuda_ext"):
        opt.choose_adam(ds_config("zero1", "deepspeed.optimizer=apex_fused"), "cuda", "apex_fused")
    with pytest.raises(ConfigError, match="needs CUDA"):
        opt.choose_adam(ds_config("zero1"), "cpu", "ds_fused")
    assert opt.choose_adam(ds_config("zero2_offload"), "cuda", "torch").name == "torch AdamW (fused)"
