#!/bin/bash
# megadeep run 'tiny-2x8': TP=2 × DP=8 × PP=1 = 16 ranks on 2 node(s) × 8 GPU(s).
# Written by: megadeep launch examples (configs/tiny.yaml name=tiny-2x8 train.global_batch_size=128 checkpoint.dir=runs/tiny-2x8/checkpoints)
# The run config (resolved for this world size) is launch/tiny_2x8.json.
# Time limit: 180 s before it, SLURM sends USR1 to every rank; each finishes its step,
# saves a checkpoint to checkpoint.dir=runs/tiny-2x8/checkpoints and exits 75; this script
# then requeues the job and the next start resumes from that checkpoint (SLURM_RESTART_COUNT > 0).
#
# rank map: 2 node(s) × 8 rank(s), TP=2 DP=8 PP=1 (node i is the i-th host of the allocation)
#   node 0: rank 0 (tp=0 dp=0 pp=0), rank 1 (tp=1 dp=0 pp=0), rank 2 (tp=0 dp=1 pp=0), rank 3 (tp=1 dp=1 pp=0), rank 4 (tp=0 dp=2 pp=0), rank 5 (tp=1 dp=2 pp=0), rank 6 (tp=0 dp=3 pp=0), rank 7 (tp=1 dp=3 pp=0)
#   node 1: rank 8 (tp=0 dp=4 pp=0), rank 9 (tp=1 dp=4 pp=0), rank 10 (tp=0 dp=5 pp=0), rank 11 (tp=1 dp=5 pp=0), rank 12 (tp=0 dp=6 pp=0), rank 13 (tp=1 dp=6 pp=0), rank 14 (tp=0 dp=7 pp=0), rank 15 (tp=1 dp=7 pp=0)
#
#SBATCH --job-name=tiny-2x8
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8     # one task (rank) per GPU
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180     # time-limit warning to every rank: save and requeue
#SBATCH --requeue                # the job may go back to the queue (also after a node failure)
#SBATCH --open-mode=append       # a requeued run appends to the same log
#SBATCH --output=runs/tiny-2x8/slurm-%j.out
#SBATCH --chdir=.

set -uo pipefail   # no -e: the exit status of the ranks decides what happens next

# Rendezvous: rank 0 runs on the first host of the allocation; the port is fixed per job id, so
# every node computes the same one and two jobs sharing a node do not collide.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))

# NCCL defaults; export any of them before sbatch to override. A collective that waits longer than
# train.dist_timeout_s fails the run instead of hanging it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}   # on error: abort and exit
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}   # InfiniBand retry timeout 4.096 µs × 2^22 ≈ 17 s
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # TP>1: keep TP comm kernels in issue order with compute

echo "megadeep: job $SLURM_JOB_ID start $(date -Is), restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"

# First step: make the token data ready once (a rank never builds it while the others wait).
srun --nodes=1 --ntasks=1 \
    python -m megadeep data prepare launch/tiny_2x8.json || exit 2

# One task per rank, placed in blocks (node i holds ranks i×per_node ...), which keeps each TP
# group on one node. Each task runs the trainer directly; it reads its rank from SLURM.
# srun runs in a background subshell so that this shell can take signals while it waits: without
# a trap, a USR1 (--signal=B:USR1@..., scancel --batch/--full) would kill the shell and the job with
# it. The trap hands USR1 to srun, which forwards it to every rank. TERM (scancel, requeue) reaches the
# ranks from SLURM itself (srun would turn a forwarded TERM into SIGKILL); the shell only stays to
# report. srun's status goes through a file: bash's `wait` returns a wrong status when signals keep
# interrupting it (seen with USR1 every few ms), and a wrong status here would fail or requeue a job.
status_file=$(mktemp)
step_pid=
trap '[ -n "$step_pid" ] && pkill -USR1 -P "$step_pid"' USR1
trap 'echo "megadeep: batch shell got TERM"' TERM
# Ranks from the nodes this start got: a requeued job may come back on another node count (after
# scontrol update NumNodes=..., a MIN-MAX node range); DP and accumulation follow, the global batch
# stays, the checkpoint reshards.
tasks=$((SLURM_JOB_NUM_NODES * 8))
( trap : USR1 TERM   # the subshell waits for srun and reports its status, whatever it is sent
srun --wait=60 --distribution=block --ntasks="$tasks" --ntasks-per-node=8 \
    python -m megadeep train launch/tiny_2x8.json
  echo $? > "$status_file" ) &
step_pid=$!
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
read -r status < "$status_file" || status=1; rm -f "$status_file"   # the ranks' status (the highest)

if [ "$status" -eq 75 ]; then
    echo "megadeep: checkpoint saved before the time limit; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
echo "megadeep: job $SLURM_JOB_ID step ended with status $status at $(date -Is)"
exit $status
