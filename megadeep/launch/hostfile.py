"""A DeepSpeed hostfile (``host slots=N`` per line) from the current SLURM allocation, for users who
start ranks with the ``deepspeed`` launcher (which reaches the other nodes over ssh/pdsh) instead of srun."""
from __future__ import annotations

import os

from megadeep.errors import ConfigError
from megadeep.launch.env import slurm_hostnames


def allocation_hosts(env=None) -> list[str]:
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ConfigError("no SLURM allocation here (SLURM_JOB_NODELIST is unset); run inside sbatch/salloc, "
                          "or pass --nodelist")
    return slurm_hostnames(nodelist)


def default_slots(env=None) -> int:
    """GPUs (or tasks) per node of the allocation."""
    env = os.environ if env is None else env
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(var, "").split("(")[0]  # SLURM_NTASKS_PER_NODE may read "4(x2)"
        if value.isdigit():
            return int(value)
    raise ConfigError("cannot tell how many ranks per node: pass --slots N")


def deepspeed_hostfile(hosts: list[str], slots: int) -> str:
    if slots < 1:
        raise ConfigError(f"--slots must be ≥ 1, got {slots}")
    return "".join(f"{host} slots={slots}\n" for host in hosts)
