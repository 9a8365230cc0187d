"""Launch without a cluster: rank discovery, the rank map and its refusals, the generated batch script,
MPI discovery under mpirun, the SIGUSR1 handler."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megadeep.errors import ConfigError
from megadeep.launch.env import detect_launcher, discover
from megadeep.launch.placement import check_placement, planned_rank_map
from megadeep.parallel.layout import Layout
from megadeep.training import preemption
from tests.helpers import ROOT

SLURM_STEP = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
              "SLURM_JOB_ID": "1234", "MASTER_ADDR": "n1"}


def test_discover_torchrun_slurm_and_single():
    pe = discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29999"})
    assert (pe.rank, pe.world_size, pe.local_rank, pe.master_addr, pe.master_port, pe.launcher) == \
        (1, 2, 1, "h", 29999, "torchrun")
    pe = discover(SLURM_STEP)
    assert (pe.rank, pe.world_size, pe.local_rank, pe.master_addr, pe.launcher) == (3, 4, 1, "n1", "slurm")
    assert pe.master_port == 20000 + 1234  # what the batch script exports: $((20000 + SLURM_JOB_ID % 20000))
    # the batch shell itself (no step) is not a rank
    assert discover({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}).launcher == "single"


def test_mpi_is_chosen_only_when_slurm_cannot_tell():
    # srun --mpi=pmi2 (or pmix) sets PMI variables that agree with SLURM's: no MPI needed
    assert detect_launcher({**SLURM_STEP, "PMI_RANK": "3", "PMI_SIZE": "4"}) == "slurm"
    assert detect_launcher({**SLURM_STEP, "PMIX_RANK": "3"}) == "slurm"
    # mpirun inside an allocation: its daemons are srun tasks, so SLURM_PROCID numbers nodes, not ranks
    assert detect_launcher({**SLURM_STEP, "SLURM_PROCID": "1", "PMI_RANK": "3", "PMI_SIZE": "8"}) == "mpi"
    assert detect_launcher({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert detect_launcher({**SLURM_STEP, "RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"  # torchrun under srun
    with pytest.raises(ConfigError, match="MEGADEEP_LAUNCHER=bogus"):
        discover({"MEGADEEP_LAUNCHER": "bogus"})


def test_mpirun_ranks_from_mpi4py(tmp_path):
    mpirun = Path(sys.executable).parent / "mpirun"
    pytest.importorskip("mpi4py", reason="PyPI mpi4py + mpich give the MPI runtime")
    if not mpirun.exists():
        pytest.skip("no mpirun next to this python (PyPI mpich provides it)")
    code = ("import sys; from pathlib import Path; from megadeep.launch.env import discover; pe = discover(); "
            "Path(sys.argv[1], str(pe.rank)).write_text(' '.join(map(str, (pe.rank, pe.world_size, pe.local_rank, "
            "pe.master_addr, pe.master_port, pe.launcher))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))}
    proc = subprocess.run([str(mpirun), "-n", "3", sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [(tmp_path / str(r)).read_text().split() for r in range(3)]
    assert [r[:3] for r in rows] == [["0", "3", "0"], ["1", "3", "1"], ["2", "3", "2"]]
    assert len({(r[3], r[4]) for r in rows}) == 1 and {r[5] for r in rows} == {"mpi"}  # one rendezvous point


def test_rank_map_and_refusals():
    text = planned_rank_map(Layout(tp=2, dp=2, pp=2), nodes=2, per_node=4)
    assert "node 0: rank 0 (tp=0 dp=0 pp=0), rank 1 (tp=1 dp=0 pp=0), rank 2 (tp=0 dp=1 pp=0)" in text
    assert "node 1: rank 4 (tp=0 dp=0 pp=1)" in text  # pipeline stage 1 on the second node
    check_placement(Layout(tp=8, dp=2), nodes=2, per_node=8)
    with pytest.raises(ConfigError, match=r"ranks 2-3 .* span nodes \[0, 1\]"):
        check_placement(Layout(tp=2, dp=3), nodes=2, per_node=3)
    with pytest.raises(ConfigError, match="span nodes"):
        check_placement(Layout(tp=16), nodes=2, per_node=8)


def launch(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "megadeep", "launch", "slurm", str(ROOT / "configs" / "tiny.yaml"),
                           *args, "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, says", [
    (["--nodes", "2", "--gpus-per-node", "3"], "for 2 node(s) × 3 = 6 ranks"),
    (["--nodes", "2", "--gpus-per-node", "1"], "would span nodes"),
    (["--nodes", "1", "--gpus-per-node", "4", "parallel.pp=3"], "not divisible by parallel.tp × parallel.pp"),
    (["--nodes", "0", "--gpus-per-node", "4"], "must be ≥ 1"),
    (["--nodes", "2-1", "--gpus-per-node", "2"], "--nodes=2-1: MIN must not exceed MAX"),
    (["--nodes", "0-2", "--gpus-per-node", "2"], "must be ≥ 1"),
    (["--nodes", "1-x", "--gpus-per-node", "2"], "--nodes must be N or MIN-MAX (e.g. 2 or 1-2), got '1-x'"),
    # elastic: a requeue onto 3 nodes (DP=3) could not keep tiny.yaml's global batch of 16
    (["--nodes", "1-3", "--gpus-per-node", "2"], "--nodes=1-3: on 3 node(s) × 2 = 6 ranks: train.global_batch_size=16"),
    (["--nodes", "1", "--gpus-per-node", "4", "--container-image", "x", "--apptainer", "y"], "pick one"),
    # what would fail on every rank after the wait in the queue
    (["--nodes", "1", "--gpus-per-node", "2"], "data.corpus=shakespeare is not prepared"),
    (["--nodes", "1", "--gpus-per-node", "2", "--prepare-data", "checkpoint.dir=/etc/passwd/ckpt"],
     "checkpoint.dir='/etc/passwd/ckpt' cannot be created"),
    (["--nodes", "1", "--gpus-per-node", "2", "--prepare-data", "--container-image", "/nonexistent/m.sqsh"],
     "--container-image '/nonexistent/m.sqsh' does not exist"),
    (["--nodes", "1", "--gpus-per-node", "2", "--prepare-data", "--apptainer", "/nonexistent/m.sif"],
     "--apptainer '/nonexistent/m.sif' does not exist"),
])
def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path, args, says):
    proc = launch(tmp_path, *args, "--submit")
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def script_for(tmp_path, *args) -> str:
    proc = launch(tmp_path, *args, "--prepare-data")  # tiny.yaml's corpus is not prepared in tmp_path
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "out" / "job.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)  # it parses as a shell script
    return script.read_text()


def test_gpu_script(tmp_path):
    text = script_for(tmp_path, "--nodes", "2", "--gpus-per-node", "2", "--time", "02:00:00",
                      "--signal-grace", "300", "--partition", "gpu")
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --time=02:00:00", "#SBATCH --signal=USR1@300", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --partition=gpu",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", '    scontrol requeue "$SLURM_JOB_ID"',
                 f"    {sys.executable} -m megadeep train {tmp_path}/out/config.json",
                 f"    {sys.executable} -m megadeep data prepare {tmp_path}/out/config.json || exit 2",
                 "srun --nodes=1 --ntasks=1 \\"]:
        assert any(got.startswith(line) for got in text.splitlines()), line
    assert "#   node 1: rank 2 (tp=0 dp=1 pp=0), rank 3 (tp=1 dp=1 pp=0)" in text
    assert "ssh" not in text and "pdsh" not in text and "--mpi" not in text
    resolved = (tmp_path / "out" / "config.json").read_text()
    # DP is left to the world size the job finds (2 here, as the rank map above says; elastic requeues:
    # test_the_job_config_resolves_again_for_another_node_count)
    assert '"dp": 0' in resolved and f'"dir": "{tmp_path}/out/checkpoints"' in resolved
    from megadeep.config import load_config, resolve

    assert resolve(load_config(tmp_path / "out" / "config.json"), 4, require_data=False).parallel.dp == 2


def test_cpu_tp1_and_container_scripts(tmp_path):
    text = script_for(tmp_path, "--nodes", "2", "--gpus-per-node", "2", "--cpu", "parallel.tp=1",
                      "train.global_batch_size=32", "--launcher", "mpi")
    assert "#SBATCH --gpus-per-node" not in text and "NCCL" not in text and "CUDA_DEVICE_MAX_CONNECTIONS" not in text
    assert "srun --wait=60 --distribution=block --mpi=pmi2" in text and "export MEGADEEP_LAUNCHER=mpi" in text
    (tmp_path / "megadeep.sqsh").touch()
    (tmp_path / "megadeep.sif").touch()
    text = script_for(tmp_path, "--nodes", "1", "--gpus-per-node", "4", "--container-image", f"{tmp_path}/megadeep.sqsh",
                      "--container-mounts", "/data:/data")
    assert (f"--container-image={tmp_path}/megadeep.sqsh --container-mounts={tmp_path}:{tmp_path},/data:/data "
            f"--container-workdir={tmp_path}") in text
    assert f"    python -m megadeep train {tmp_path}/out/config.json" in text
    text = script_for(tmp_path, "--nodes", "1", "--gpus-per-node", "4", "--apptainer", f"{tmp_path}/megadeep.sif")
    assert f"    apptainer exec --nv --bind {tmp_path}:{tmp_path} {tmp_path}/megadeep.sif python -m megadeep train" in text


def test_usr1_handler_keeps_the_request_until_cleared():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        request = preemption.install()
        assert preemption.install() is request  # idempotent: an early install in the CLI is kept
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.signum == signal.SIGUSR1
        assert preemption.any_rank_requested(request, "cpu")  # one process: no collective needed
        request.clear()
        assert not preemption.any_rank_requested(request, "cpu")
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_job_config_resolves_again_for_another_node_count(tmp_path):
    """A requeued job may come back on fewer or more nodes: its config leaves DP and accumulation to the
    world size it finds (the checkpoint reshards, tests/test_checkpoint_train.py), keeping the global batch."""
    script_for(tmp_path, "--nodes", "2", "--gpus-per-node", "2", "--cpu", "train.global_batch_size=32")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["parallel"]["dp"] == 0 and saved["train"]["grad_accum_steps"] == 0
    from megadeep.config import load_config, resolve

    for world, dp, accum in ((2, 1, 4), (4, 2, 2), (8, 4, 1)):  # 2 CPU slots per node: 1, 2 and 4 nodes
        cfg = resolve(load_config(tmp_path / "out" / "config.json"), world, require_data=False)
        assert (cfg.parallel.dp, cfg.train.grad_accum_steps, cfg.train.global_batch_size) == (dp, accum, 32)


def test_elastic_node_range_script(tmp_path):
    """``--nodes=MIN-MAX``: SLURM's range form in the script, the layout checked for every count in it."""
    text = script_for(tmp_path, "--nodes", "1-2", "--gpus-per-node", "2", "--cpu")
    assert "#SBATCH --nodes=1-2\n" in text and "on 1-2 node(s) × 2 CPU slot(s)" in text
