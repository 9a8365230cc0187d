"""sbatch scripts that start one rank per GPU with ``srun`` and survive the time limit by requeueing.

The script is meant to be read: every choice is commented where it is made. Ranks learn who they are
from SLURM's own variables (``megadeep.launch.env``): no ssh, no pdsh, no hostfile. The time-limit
contract is an exit code: on ``--signal=USR1@<grace>`` every rank finishes its step, saves a checkpoint
and exits with :data:`REQUEUE_EXIT`; the script then requeues the job, whose next start resumes.
"""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from megadeep.config.schema import RunConfig
from megadeep.errors import ConfigError
from megadeep.launch.env import PORT_BASE, PORT_SPAN
from megadeep.launch.placement import planned_rank_map
from megadeep.parallel.layout import Layout

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later", i.e. saved before the time limit, please requeue
LAUNCHERS = ("srun", "mpi")
# a rank that dies takes the others down after this long, instead of leaving them in a collective
SRUN_WAIT_S = 60
# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
_NODES = re.compile(r"(\d+)(?:-(\d+))?")


def parse_nodes(text: str) -> tuple[int, int]:
    """``--nodes``: ``N`` → (N, 0); SLURM's elastic range ``MIN-MAX`` → (MIN, MAX)."""
    m = _NODES.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"--nodes must be N or MIN-MAX (e.g. 2 or 1-2), got '{text}'")
    return int(m.group(1)), int(m.group(2) or 0)


_WORD = re.compile(r"[A-Za-z0-9._,+@%:/=-]*")  # what an #SBATCH value may hold: no spaces, quotes, newlines


@dataclass
class SlurmJob:
    """What the allocation looks like and how ranks start (everything but the run config)."""
    nodes: int  # the fewest nodes (SLURM's --nodes=MIN-MAX range form: MIN)
    per_node: int  # GPUs per node, one rank each; CPU slots with ``cpu``
    time: str = "01:00:00"
    signal_grace_s: int = 180  # USR1 this long before the time limit: enough for one step and a save
    cpu: bool = False  # gloo on CPU: no GPU request (test clusters)
    launcher: str = "srun"  # srun: ranks from SLURM_*; mpi: srun --mpi=pmi2, ranks from mpi4py
    partition: str = ""
    account: str = ""
    cpus_per_task: int = 0
    container_image: str = ""  # pyxis/enroot image (srun --container-image)
    apptainer: str = ""  # Apptainer image (.sif) to ``apptainer exec``
    container_mounts: list[str] = field(default_factory=list)  # src:dst, beyond the working directory
    python: str = "python"
    workdir: str = "."
    max_nodes: int = 0  # an elastic allocation's most nodes (--nodes=MIN-MAX); 0: exactly ``nodes``

    @property
    def node_counts(self) -> range:
        """Every node count SLURM may start (or requeue) this job on."""
        return range(self.nodes, max(self.nodes, self.max_nodes) + 1)

    @property
    def nodes_spec(self) -> str:
        return f"{self.nodes}-{self.max_nodes}" if self.max_nodes else str(self.nodes)

    def check(self) -> None:
        if self.nodes < 1 or self.per_node < 1:
            raise ConfigError(f"--nodes and --gpus-per-node must be ≥ 1, got {self.nodes} and {self.per_node}")
        if self.max_nodes and self.max_nodes < self.nodes:
            raise ConfigError(f"--nodes={self.nodes_spec}: MIN must not exceed MAX")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got '{self.launcher}'")
        if self.container_image and self.apptainer:
            raise ConfigError("--container-image (pyxis) and --apptainer are two ways to run in a container; pick one")
        if self.signal_grace_s < 1:
            raise ConfigError(f"--signal-grace must be ≥ 1 second, got {self.signal_grace_s}")
        if not _TIME.fullmatch(self.time):
            raise ConfigError(f"--time '{self.time}' is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
        if self.cpus_per_task < 0:
            raise ConfigError(f"--cpus-per-task must be ≥ 0 (0: SLURM's default), got {self.cpus_per_task}")
        for flag, value in (("--partition", self.partition), ("--account", self.account)):
            if not _WORD.fullmatch(value):
                raise ConfigError(f"{flag} '{value}' may hold only letters, digits and ._,+@%:/=- (it goes into #SBATCH)")
        for mount in self.container_mounts:
            if mount.count(":") not in (1, 2) or not all(mount.split(":")[:2]):
                raise ConfigError(f"--container-mounts entry '{mount}' is not SRC:DST[:FLAGS]")
        if not Path(self.workdir).is_dir():
            raise ConfigError(f"--workdir '{self.workdir}' is not a directory")
        if not self.python.strip() or "\n" in self.python:
            raise ConfigError("--python must name a python executable")


def _sbatch_lines(job: SlurmJob, name: str, log: str) -> list[str]:
    unit = "CPU slot" if job.cpu else "GPU"
    lines = [
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={job.nodes_spec}",
        f"#SBATCH --ntasks-per-node={job.per_node}     # one task (rank) per {unit}",
    ]
    if not job.cpu:
        lines.append(f"#SBATCH --gpus-per-node={job.per_node}")
    if job.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    lines += [
        f"#SBATCH --time={job.time}",
        f"#SBATCH --signal=USR1@{job.signal_grace_s}     # time-limit warning to every rank: save and requeue",
        "#SBATCH --requeue                # the job may go back to the queue (also after a node failure)",
        "#SBATCH --open-mode=append       # a requeued run appends to the same log",
        f"#SBATCH --output={log}",
        f"#SBATCH --chdir={job.workdir}",
    ]
    lines += [f"#SBATCH --partition={job.partition}"] * bool(job.partition)
    lines += [f"#SBATCH --account={job.account}"] * bool(job.account)
    return lines


def _env_lines(job: SlurmJob, layout: Layout) -> list[str]:
    lines = [
        "# Rendezvous: rank 0 runs on the first host of the allocation; the port is fixed per job id, so",
        "# every node computes the same one and two jobs sharing a node do not collide.",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
    ]
    if job.launcher == "mpi":
        lines.append("export MEGADEEP_LAUNCHER=mpi   # ranks from mpi4py (MPI_COMM_WORLD), not SLURM_PROCID")
    lines.append("")
    if job.cpu:
        lines += ["# CPU ranks talk over gloo; one thread per rank unless --cpus-per-task says otherwise.",
                  "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"]
        return lines
    lines += [
        "# NCCL defaults; export any of them before sbatch to override. A collective that waits longer than",
        "# train.dist_timeout_s fails the run instead of hanging it.",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}   # on error: abort and exit",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        "export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}   # InfiniBand retry timeout 4.096 µs × 2^22 ≈ 17 s",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
    ]
    if layout.tp > 1:
        lines.append("export CUDA_DEVICE_MAX_CONNECTIONS=1   # TP>1: keep TP comm kernels in issue order with compute")
    return lines


def job_config(resolved: RunConfig, given: RunConfig) -> RunConfig:
    """The run config the job reads: ``resolved`` with DP and accumulation as ``given`` (0: derived), so
    that a requeued job that comes back on another node count resolves them again for its world size
    (the checkpoint reshards; the global batch stays)."""
    out = copy.deepcopy(resolved)
    out.parallel.dp, out.train.grad_accum_steps = given.parallel.dp, given.train.grad_accum_steps
    return out


def _is_local_image(ref: str) -> bool:
    """A file path, not a registry reference (``nvcr.io#nvidia/pytorch:24.01-py3``, ``docker://...``)."""
    return "://" not in ref and "#" not in ref and (ref.startswith(("/", ".", "~")) or ref.endswith((".sqsh", ".sif")))


def check_before_submit(job: SlurmJob, cfg: RunConfig, prepare_data: bool) -> None:
    """What would otherwise fail on every rank after the wait in the queue: data that is not prepared
    (and will not be by the script's first step), a checkpoint dir that cannot be written, a container
    image file that is not there."""
    from megadeep.config.validate import check_writable_dir
    from megadeep.data.prepare import prepare_data as ready_data

    for flag, image in (("--container-image", job.container_image), ("--apptainer", job.apptainer)):
        if image and _is_local_image(image) and not Path(image).expanduser().is_file():
            raise ConfigError(f"{flag} '{image}' does not exist; give the image file on shared storage")
    if cfg.checkpoint.dir:
        check_writable_dir(cfg.checkpoint.dir, "checkpoint.dir")
    if not prepare_data:
        try:
            ready_data(cfg, build=False)
        except ConfigError as e:  # DataError too
            raise ConfigError(f"{e} (or pass --prepare-data: the job prepares it before the ranks start)") from None


def _srun_line(job: SlurmJob, config: str, command: str = "train") -> str:
    srun = ["srun", f"--wait={SRUN_WAIT_S}", "--distribution=block"]
    if command != "train":  # a one-off step on the first node
        srun = ["srun", "--nodes=1", "--ntasks=1"]
    if job.launcher == "mpi":
        srun.append("--mpi=pmi2")
    mounts = [f"{job.workdir}:{job.workdir}", *job.container_mounts]
    prefix: list[str] = []
    if job.container_image:
        srun += [f"--container-image={job.container_image}", f"--container-mounts={','.join(mounts)}",
                 f"--container-workdir={job.workdir}"]
    elif job.apptainer:
        prefix = ["apptainer", "exec", *(["--nv"] if not job.cpu else []), "--bind", ",".join(mounts), job.apptainer]
    cmd = [*prefix, job.python, "-m", "megadeep", *command.split(), config]
    tasks = f' --ntasks="$tasks" --ntasks-per-node={job.per_node}' if command == "train" else ""
    return " \\\n    ".join([shlex.join(srun) + tasks, shlex.join(cmd)])


def render(job: SlurmJob, cfg: RunConfig, config_path: str, log_path: str, command: str,
           prepare_data: bool = False) -> str:
    """The batch script for the resolved ``cfg``, saved at ``config_path``."""
    job.check()
    p = cfg.parallel
    layout = Layout(tp=p.tp, dp=p.dp, pp=p.pp)
    unit = "CPU slot(s)" if job.cpu else "GPU(s)"
    rank_map = planned_rank_map(layout, job.nodes, job.per_node)
    body = [
        "#!/bin/bash",
        f"# megadeep run '{cfg.name}': TP={p.tp} × DP={p.dp} × PP={p.pp} = {layout.world_size} ranks "
        f"on {job.nodes_spec} node(s) × {job.per_node} {unit}.",
        f"# Written by: {command}",
        f"# The run config (resolved for this world size) is {config_path}.",
        f"# Time limit: {job.signal_grace_s} s before it, SLURM sends USR1 to every rank; each finishes its step,",
        f"# saves a checkpoint to checkpoint.dir={cfg.checkpoint.dir} and exits {REQUEUE_EXIT}; this script",
        "# then requeues the job and the next start resumes from that checkpoint (SLURM_RESTART_COUNT > 0).",
        "#",
        *("# " + line for line in rank_map.splitlines()),
        "#",
        *_sbatch_lines(job, cfg.name, log_path),
        "",
        "set -uo pipefail   # no -e: the exit status of the ranks decides what happens next",
        "",
        *_env_lines(job, layout),
        "",
        'echo "megadeep: job $SLURM_JOB_ID start $(date -Is), restart ${SLURM_RESTART_COUNT:-0}, '
        'nodes $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"',
        "",
        *(["# First step: make the token data ready once (a rank never builds it while the others wait).",
           _srun_line(job, config_path, "data prepare") + " || exit 2", ""] if prepare_data else []),
        "# One task per rank, placed in blocks (node i holds ranks i×per_node ...), which keeps each TP",
        "# group on one node. Each task runs the trainer directly; it reads its rank from SLURM.",
        "# srun runs in a background subshell so that this shell can take signals while it waits: without",
        "# a trap, a USR1 (--signal=B:USR1@..., scancel --batch/--full) would kill the shell and the job with",
        "# it. The trap hands USR1 to srun, which forwards it to every rank. TERM (scancel, requeue) reaches the",
        "# ranks from SLURM itself (srun would turn a forwarded TERM into SIGKILL); the shell only stays to",
        "# report. srun's status goes through a file: bash's `wait` returns a wrong status when signals keep",
        "# interrupting it (seen with USR1 every few ms), and a wrong status here would fail or requeue a job.",
        'status_file=$(mktemp)',
        "step_pid=",
        'trap \'[ -n "$step_pid" ] && pkill -USR1 -P "$step_pid"\' USR1',
        'trap \'echo "megadeep: batch shell got TERM"\' TERM',
        "# Ranks from the nodes this start got: a requeued job may come back on another node count (after",
        "# scontrol update NumNodes=..., a MIN-MAX node range); DP and accumulation follow, the global batch",
        "# stays, the checkpoint reshards.",
        f"tasks=$((SLURM_JOB_NUM_NODES * {job.per_node}))",
        "( trap : USR1 TERM   # the subshell waits for srun and reports its status, whatever it is sent",
        _srun_line(job, config_path),
        '  echo $? > "$status_file" ) &',
        "step_pid=$!",
        'while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done',
        'read -r status < "$status_file" || status=1; rm -f "$status_file"   # the ranks\' status (the highest)',
        "",
        f'if [ "$status" -eq {REQUEUE_EXIT} ]; then',
        '    echo "megadeep: checkpoint saved before the time limit; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'echo "megadeep: job $SLURM_JOB_ID step ended with status $status at $(date -Is)"',
        "exit $status",
    ]
    return "\n".join(body) + "\n"


def submit(script: Path) -> int:
    """``sbatch`` the script; returns the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("sbatch is not on PATH: submit from a SLURM login node, or drop --submit") from None
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    return int(proc.stdout.strip().split(";")[0])
