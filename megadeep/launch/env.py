"""Who am I? Rank discovery from whichever launcher started this process, then torch.distributed.

Supported: torchrun and DeepSpeed's launcher (RANK/WORLD_SIZE/LOCAL_RANK), ``srun`` (SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID), and a plain ``python`` (one rank). The result is exported as the
``env://`` variables so torch.distributed and DeepSpeed see one consistent picture.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr(env) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def slurm_master_port(job_id: int) -> int:
    """A port that is the same on every node of a job and different between jobs."""
    return 20000 + job_id % 20000


def discover(env=None) -> ProcessEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # inside an srun step, not the batch shell
        port = int(env.get("MASTER_PORT") or slurm_master_port(int(env["SLURM_JOB_ID"])))
        return ProcessEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]),
                          _slurm_master_addr(env), port, "slurm")
    return ProcessEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def world_size_from_env(env=None) -> int | None:
    """The world size a launcher already fixed for this process, or None for a plain start."""
    pe = discover(env)
    return None if pe.launcher == "single" else pe.world_size


def init_distributed(pe: ProcessEnv, device_type: str, timeout_s: float) -> None:
    """Initialise torch.distributed through DeepSpeed (so its comm layer is set up too); idempotent."""
    import deepspeed
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(RANK=str(pe.rank), WORLD_SIZE=str(pe.world_size), LOCAL_RANK=str(pe.local_rank),
                      MASTER_ADDR=pe.master_addr, MASTER_PORT=str(pe.master_port))
    if device_type == "cuda":
        torch.cuda.set_device(pe.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s))
