"""One device per rank, decided before anything touches CUDA, simulated on CPU with a patched torch.cuda:
an 8-GPU node at LOCAL_RANK 3 (all GPUs visible) and the same rank given one GPU by the launcher."""
import sys

import pytest
import torch

from megadeep.config import load_config, resolve
from megadeep.errors import ConfigError
from megadeep.launch import env
from megadeep.launch.env import ProcessEnv, bind_device, cuda_index


class FakeCuda:
    """The parts of torch.cuda a rank consults to pick and set its GPU."""

    def __init__(self, monkeypatch, visible: int):
        # DeepSpeed keeps the accelerator it first picks (importing it picks one) for the whole process:
        # picked under this fake GPU, it would be CUDA's for every later test in the process. Imported
        # first, so the real one is picked, and restored afterwards.
        from deepspeed.accelerator import real_accelerator
        monkeypatch.setattr(real_accelerator, "ds_accelerator", real_accelerator.get_accelerator())
        self.visible, self.current, self.set_calls = visible, 0, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)

    def set_device(self, device) -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        assert 0 <= index < self.visible, f"cuda:{index} does not exist with {self.visible} visible GPU(s)"
        self.set_calls.append(index)
        self.current = index


RANK3 = ProcessEnv(rank=11, world_size=16, local_rank=3, master_addr="n1", master_port=29500, launcher="slurm")


@pytest.mark.parametrize("visible,expected", [(8, 3), (1, 0)])
def test_bind_device_and_what_deepspeed_sees(monkeypatch, visible, expected):
    cuda = FakeCuda(monkeypatch, visible)
    device = bind_device(RANK3, "auto")
    assert device == torch.device("cuda", expected) and cuda.current == expected
    # The engine (and a pipeline module) put themselves on cuda:LOCAL_RANK: init_distributed must export
    # the device index there, not the local rank, or one-GPU-per-task ranks ask for a GPU they cannot see.
    seen = {}
    monkeypatch.setattr("deepspeed.init_distributed", lambda dist_backend, **kw: seen.update(backend=dist_backend))
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: False)
    monkeypatch.setattr(env.os, "environ", {"OMPI_COMM_WORLD_LOCAL_RANK": "3"})  # Open MPI's mpirun
    env.init_distributed(RANK3, device, 60)
    assert seen["backend"] == "nccl"
    assert env.os.environ["LOCAL_RANK"] == env.os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] == str(expected)
    assert env.os.environ["RANK"] == "11"
    assert device == torch.device(f"cuda:{env.os.environ['LOCAL_RANK']}")  # DeepSpeed's engine device


def test_more_ranks_than_visible_gpus_is_one_clear_error(monkeypatch):
    FakeCuda(monkeypatch, 2)
    with pytest.raises(ConfigError, match="local rank 3 has no GPU: this process sees 2"):
        bind_device(RANK3, "cuda")
    assert cuda_index(3, 8) == 3 and cuda_index(5, 1) == 0


def test_cpu_device_never_touches_cuda(monkeypatch):
    cuda = FakeCuda(monkeypatch, 8)
    assert bind_device(RANK3, "cpu") == torch.device("cpu") and cuda.set_calls == []


class Stop(Exception):
    pass


def test_trainer_binds_its_device_before_distributed_init(monkeypatch):
    """The trainer's device at the moment it starts torch.distributed/DeepSpeed is cuda:LOCAL_RANK and is
    the current CUDA device (what DeepSpeed's accelerator and every later CUDA tensor use). Before the
    fix the trainer read torch.cuda.current_device() first, i.e. cuda:0 on every rank of the node."""
    from megadeep.training import trainer as trainer_mod

    cuda = FakeCuda(monkeypatch, 8)
    monkeypatch.setattr(trainer_mod, "discover", lambda: RANK3)
    seen = {}

    def fake_init(pe, device, timeout):
        seen["trainer_device"] = sys._getframe(1).f_locals["self"].device
        seen["current"] = cuda.current
        raise Stop

    monkeypatch.setattr(trainer_mod, "init_distributed", fake_init)
    cfg = resolve(load_config(None, ["data.corpus=shakespeare", "train.device=cuda", "log.progress=false"]), 1)
    with pytest.raises(Stop):
        trainer_mod.Trainer(cfg)
    assert seen == {"trainer_device": torch.device("cuda", 3), "current": 3}
