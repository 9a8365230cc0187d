"""Who am I? Rank discovery from whichever launcher started this process, then torch.distributed.

Supported: torchrun and DeepSpeed's launcher (RANK/WORLD_SIZE/LOCAL_RANK), ``srun`` (SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID), MPI launchers through mpi4py (``mpirun``, ``srun --mpi=pmi2``), and a plain
``python`` (one rank). The result is exported as the ``env://`` variables so torch.distributed and
DeepSpeed see one consistent picture. ``MEGADEEP_LAUNCHER=torchrun|slurm|mpi|single`` overrides the
detection (the generated ``--launcher mpi`` batch scripts set it to take ranks from mpi4py).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

from megadeep.errors import ConfigError

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")
# (rank, size) variables MPI launchers set: Open MPI, MPICH's hydra and SLURM's pmi2, PMIx (no size)
_MPI_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"), ("PMIX_RANK", None))


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


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``n[1-2],gpu07``) into host names, in allocation order."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _slurm_master_addr(env) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    return slurm_hostnames(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))[0]


PORT_BASE, PORT_SPAN = 20000, 20000  # job ports; the batch scripts compute the same in shell


def slurm_master_port(job_id: int) -> int:
    """A port that is the same on every node of a job and different between jobs."""
    return PORT_BASE + job_id % PORT_SPAN


def _mpi_position(env) -> tuple[int, int | None] | None:
    for rank_var, size_var in _MPI_VARS:
        if rank_var in env:
            return int(env[rank_var]), int(env[size_var]) if size_var and size_var in env else None
    return None


def detect_launcher(env) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    in_step = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env  # inside an srun step, not the batch shell
    mpi = _mpi_position(env)
    if mpi is not None:
        # srun with a PMI plugin sets both and they agree: SLURM's are enough. mpirun inside an
        # allocation starts its daemons with srun, so there SLURM_PROCID numbers nodes, not ranks.
        rank, size = mpi
        agrees = in_step and rank == int(env["SLURM_PROCID"]) and size in (None, int(env["SLURM_NTASKS"]))
        if not agrees:
            return "mpi"
    return "slurm" if in_step else "single"


@functools.cache
def _mpi_world() -> tuple[int, int, int, str, int]:
    """Rank, size, local rank, rank 0's host and a free port there, from MPI_COMM_WORLD. MPI is then
    finalized: the ranks talk through torch.distributed, and an MPI left open until exit was seen to
    hang there under ``srun --mpi=pmi2``. Cached, since MPI cannot be asked twice."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    host, port = comm.bcast((socket.gethostname(), _free_port()) if rank == 0 else None)
    MPI.Finalize()
    return rank, size, local_rank, host, port


def _from_mpi(env) -> ProcessEnv:
    try:
        rank, size, local_rank, host, port = _mpi_world()
    except ImportError as e:
        raise ConfigError(f"this process was started by an MPI launcher, but mpi4py does not import ({e}); "
                          "pip install mpi4py mpich, or start ranks with torchrun or plain srun") from None
    tasks = int(env.get("SLURM_NTASKS", 1)) if "SLURM_STEP_ID" in env else 1
    if size == 1 and tasks > 1:  # each task initialised MPI on its own
        raise ConfigError(f"mpi4py sees 1 rank but srun started {tasks} tasks: the MPI library under mpi4py "
                          "does not speak srun's PMI; use srun --mpi=pmi2 with PyPI mpich")
    port = env.get("MASTER_PORT") or (slurm_master_port(int(env["SLURM_JOB_ID"])) if "SLURM_JOB_ID" in env else port)
    return ProcessEnv(rank, size, local_rank, env.get("MASTER_ADDR") or host, int(port), "mpi")


def discover(env=None) -> ProcessEnv:
    env = os.environ if env is None else env
    launcher = env.get("MEGADEEP_LAUNCHER") or detect_launcher(env)
    if launcher not in LAUNCHERS:
        raise ConfigError(f"MEGADEEP_LAUNCHER={launcher} is not one of {', '.join(LAUNCHERS)}")
    if launcher == "torchrun":
        return ProcessEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if launcher == "mpi":
        return _from_mpi(env)
    if launcher == "slurm":
        port = int(env.get("MASTER_PORT") or slurm_master_port(int(env["SLURM_JOB_ID"])))
        return ProcessEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]),
                          _slurm_master_addr(env), port, "slurm")
    return ProcessEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def world_size_from_env(env=None) -> int | None:
    """The world size a launcher already fixed for this process, or None for a plain start."""
    pe = discover(env)
    return None if pe.launcher == "single" else pe.world_size


def cuda_index(local_rank: int, visible: int) -> int:
    """Which visible GPU a rank uses: its local rank when the node's GPUs are all visible, GPU 0 when
    the launcher gave each task one (``srun --gpus-per-task=1``/``--gpu-bind``, a per-rank
    ``CUDA_VISIBLE_DEVICES``)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise ConfigError(f"local rank {local_rank} has no GPU: this process sees {visible} "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at "
                          "most one rank per visible GPU, or give each task its own GPU")
    return local_rank


def bind_device(pe: ProcessEnv, requested: str):
    """This rank's device, decided once from the process environment and made current before any
    CUDA tensor, RNG state or DeepSpeed call (``train.device``: auto | cpu | cuda)."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device; use train.device=auto or cpu")
    device = torch.device("cuda", cuda_index(pe.local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def init_distributed(pe: ProcessEnv, device, timeout_s: float) -> None:
    """Initialise torch.distributed through DeepSpeed (so its comm layer is set up too); idempotent.
    ``device`` comes from :func:`bind_device`. DeepSpeed places the engine and pipeline stages on
    ``LOCAL_RANK``'s GPU, so on CUDA that variable carries the device index (0 with one GPU per task)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    local = device.index if device.type == "cuda" else pe.local_rank
    os.environ.update(RANK=str(pe.rank), WORLD_SIZE=str(pe.world_size), LOCAL_RANK=str(local),
                      MASTER_ADDR=pe.master_addr, MASTER_PORT=str(pe.master_port))
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:  # DeepSpeed's engine asserts the two agree
        os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(local)
    # DeepSpeed print()s "...shm_comm_op built successfully" on every rank: rank 0 says it once
    with contextlib.redirect_stdout(io.StringIO()) if pe.rank != 0 else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s))


def quiet_libraries(device, rank: int) -> None:
    """Logs a person can read: call after :func:`bind_device`, before anything else imports DeepSpeed.
    ``DS_ACCELERATOR`` from the bound device stops DeepSpeed's accelerator auto-detection (a warning
    per rank); its logger says only warnings, and on ranks other than 0 only errors."""
    import logging
    import warnings

    if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed reads it once, when it first picks its accelerator
        os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"
        try:
            from deepspeed.accelerator import get_accelerator

            get_accelerator()
        finally:  # not inherited by processes this one starts (tests run several trainers in one process)
            del os.environ["DS_ACCELERATOR"]
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    # DeepSpeed's ZeRO/comm layer calls these torch APIs, not megadeep: fixable only in DeepSpeed.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            FutureWarning, r"torch\.distributed\.c10d_logger")
    warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning,
                            r"torch\.jit\._script")
