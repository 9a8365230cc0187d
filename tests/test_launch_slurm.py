"""``megadeep launch slurm`` against a real SLURM: two nodes (n1, n2) × 2 CPU ranks, gloo, TP=2 × DP=2.

1. the generated script trains, and the ranks' own report puts each TP pair on one node;
2. USR1 to the batch shell mid-run → checkpoint, requeue, resume: every step exactly once, losses equal to
   run 1's; USR1s during the save and during the exit change nothing; an ``scontrol requeue`` repeats the
   steps after the last checkpoint, and the restart records make readers count each once;
3. the same run with ``--launcher mpi`` (srun --mpi=pmi2, ranks from mpi4py) gives the same losses;
4. a layout that does not fit the allocation, an unprepared corpus or an unwritable checkpoint dir is
   refused and nothing reaches the queue;
5. a SIGSTOPped rank ends the job within train.hang_timeout_s + 60 s, named;
6. elastic: requeued onto 1 node and back onto 2, the losses stay run 1's.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megadeep.parallel.layout import Layout
from tests.helpers import ROOT, write_text

STEPS = 24
LAYOUT = Layout(tp=2, dp=2)


def tiny_overrides(tmp_path, metrics):
    data = write_text(tmp_path / "data.txt", n_words=20000)
    return ["model.dim=64", "model.n_layers=2", "model.ffn_dim=128", "model.max_seq_len=32", "train.seq_len=32",
            "train.micro_batch_size=4", "train.global_batch_size=8", f"train.steps={STEPS}", "optim.warmup_steps=2",
            "train.eval_every=0", "log.log_every=1", "data.source=bytes", "data.corpus=", f"data.paths={data}",
            f"log.metrics_file={metrics}"]


def launch(cluster, workdir, *args):
    return subprocess.run([sys.executable, "-m", "megadeep", "launch", "slurm", str(ROOT / "configs" / "tiny.yaml"),
                           *args], cwd=workdir, env=cluster.env, capture_output=True, text=True, timeout=120)


def submit(cluster, tmp_path, name, *extra):
    """Write and submit the 2 × 2 CPU job; returns (job id, its log file, its metrics file)."""
    workdir = tmp_path / name
    workdir.mkdir()
    metrics = workdir / "metrics.jsonl"
    proc = launch(cluster, workdir, *tiny_overrides(workdir, metrics), "--nodes", "2", "--gpus-per-node", "2",
                  "--cpu", "--time", "10", "--out", "out", "--submit", *extra)
    assert proc.returncode == 0, proc.stderr
    job_id = int(re.search(r"submitted job (\d+)", proc.stdout).group(1))
    return job_id, workdir / "out" / f"slurm-{job_id}.out", metrics


def read_log(log):
    return log.read_text() if log.exists() else ""


def step_losses(metrics):
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def check_rank_map(log, launcher):
    """The map the ranks reported (node from SLURMD_NODENAME, coords from their process groups)."""
    line = re.search(rf"^rank map \({launcher}\): (.*)$", log, re.M)
    assert line, log[-3000:]
    placed = {}
    for node, entries in re.findall(r"(\S+): ((?:rank \d+ \([^)]*\)(?:, )?)+)", line.group(1)):
        for rank, tp, dp, pp in re.findall(r"rank (\d+) \(tp=(\d+) dp=(\d+) pp=(\d+)\)", entries):
            placed[int(rank)] = (node, (int(tp), int(dp), int(pp)))
    assert sorted(placed) == list(range(LAYOUT.world_size)), line.group(0)
    for rank, (node, coord) in placed.items():
        assert coord == tuple(LAYOUT.coord(rank)), (rank, coord)
        assert node == f"n{rank // 2 + 1}", (rank, node)  # blocks of 2 ranks per node, in node order
    for group in LAYOUT.tp_groups():
        assert len({placed[r][0] for r in group}) == 1, f"TP group {group} spans nodes: {line.group(0)}"


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """Proof 1: the generated script trains TP=2 × DP=2 on two nodes; its per-step losses."""
    tmp = tmp_path_factory.mktemp("reference")
    job_id, log, metrics = submit(slurm_cluster, tmp, "srun")
    # long: on a fresh machine the first DeepSpeed start JIT-builds its CPU comm op (~2.5 min on 2 cores)
    job = slurm_cluster.wait_job(job_id, timeout=600)
    text = read_log(log)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, text[-3000:])
    return job, text, step_losses(metrics)


def test_generated_script_trains_2x2_with_tp_pairs_on_one_node(reference):
    job, log, losses = reference
    assert job["NodeList"] == "n[1-2]" and job["NumTasks"] == "4"
    check_rank_map(log, "slurm")
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    first, last = sum(v for _, v in losses[:3]) / 3, sum(v for _, v in losses[-3:]) / 3
    assert last < first - 0.5, (first, last)  # it learns: ~5.5 at the start of bytes of English


def wait_for(what, job_id, cluster, log, timeout=240, states=("PENDING", "RUNNING")):
    deadline = time.time() + timeout
    while not what():
        assert time.time() < deadline, read_log(log)[-3000:]
        assert cluster.job(job_id)["JobState"] in states, (cluster.job(job_id), read_log(log)[-3000:])
        time.sleep(0.1)


def usr1_storm(cluster, job_id, *flags, until, timeout=120):
    """USR1 every 20 ms until ``until()``; returns how many were delivered. scancel retries a job that
    is being requeued for up to a minute and would signal the next start: it gets 2 s here."""
    deadline, sent = time.time() + timeout, 0
    while not until():
        assert time.time() < deadline, f"still sending USR1 after {timeout} s"
        cmd = ("timeout", "2", "scancel", *flags, "--signal=USR1", str(job_id))
        sent += cluster.run(*cmd, check=False).returncode == 0
        time.sleep(0.02)
    return sent


def test_usr1_in_every_phase_and_a_requeue_without_usr1_lose_and_double_count_nothing(slurm_cluster, reference,
                                                                                       tmp_path):
    """Run 0: USR1 to the batch shell only (as --signal=B:USR1@... sends it) mid-run, then USR1 to the
    ranks without pause from the moment the save starts until they have exited (a second USR1 during
    the save, USR1 while ranks exit): one checkpoint, requeue. Run 1: ``scontrol requeue`` a few steps
    later, no USR1: SLURM's TERM lets the ranks save after their step if they are quick enough, else
    (SIGKILL after KillWait, or a node failure) run 2 resumes from the last periodic checkpoint and repeats
    the steps after it. Run 2: USR1 to shell and ranks from the last step's record until the job has ended (USR1
    during exit). COMPLETED; the restart records make the metrics reader and ``megadeep plot`` see each
    step once, with run 0's losses."""
    job_id, log, metrics = submit(slurm_cluster, tmp_path, "preempted", "checkpoint.save_every=4")
    logged = lambda: len(step_losses(metrics)) if metrics.exists() else 0  # noqa: E731
    wait_for(lambda: logged() >= 2, job_id, slurm_cluster, log)  # past step 2: handlers are in
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))  # the shell alone: it must forward
    wait_for(lambda: "saving a checkpoint after step" in read_log(log), job_id, slurm_cluster, log, timeout=60)
    during_save = usr1_storm(slurm_cluster, job_id, until=lambda: "step ended with status" in read_log(log))
    stopped = int(re.search(r"SIGUSR1 received; saving a checkpoint after step (\d+) and stopping", read_log(log)).group(1))
    requeueing = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD")
    wait_for(lambda: logged() >= stopped + 6, job_id, slurm_cluster, log, states=requeueing)
    slurm_cluster.run("scontrol", "requeue", str(job_id))
    wait_for(lambda: f'"step": {STEPS},' in metrics.read_text(), job_id, slurm_cluster, log, states=requeueing)
    during_exit = usr1_storm(slurm_cluster, job_id, "--full",
                             until=lambda: slurm_cluster.job(job_id)["JobState"] not in ("RUNNING", "COMPLETING"))
    job = slurm_cluster.wait_job(job_id, timeout=60)
    text = read_log(log)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2" and job["ExitCode"] == "0:0", (job, text[-4000:])
    assert during_save >= 1 and during_exit >= 1, (during_save, during_exit)

    assert 2 <= stopped < STEPS
    assert text.count("SIGUSR1 received; saving") == 1, "a USR1 during the save or the exit stopped it again"
    assert "step ended with status 75 " in text and text.count("requeueing job") == 1
    assert re.search(rf"job {job_id} start .*, restart 1,", text) and re.search(rf"job {job_id} start .*, restart 2,", text)
    assert re.search(rf"resumed from .*step_0*{stopped} at step {stopped}$", text, re.M), text[-3000:]
    check_rank_map(text, "slurm")

    # the file as written: three attempts, each start after the first marked by a restart record
    raw = [json.loads(line) for line in metrics.read_text().splitlines()]
    cuts = [i for i, r in enumerate(raw) if r.get("event") == "restart"]
    assert [raw[i]["restart"] for i in cuts] == [1, 2], cuts
    first, second = (raw[i] for i in cuts)
    assert first["resumed_from_step"] == stopped and first["hosts"] == ["n1", "n2"] and first["world_size"] == 4
    segments = [[r["step"] for r in part if "loss" in r] for part in (raw[:cuts[0]], raw[cuts[0]:cuts[1]], raw[cuts[1]:])]
    resumed = second["resumed_from_step"]
    assert segments[0] == list(range(1, stopped + 1)), "run 0 stopped after the step it saved"
    assert segments[1] == list(range(stopped + 1, segments[1][-1] + 1)), "after a USR1 save, every step once"
    # from the last checkpoint run 1 saved: periodic (every 4 steps), or on SLURM's TERM after its step
    assert stopped <= resumed <= segments[1][-1], (resumed, segments)
    assert resumed == stopped or re.search(rf"saved checkpoint .*step_0*{resumed}$", text, re.M), text[-3000:]
    assert segments[2] == list(range(resumed + 1, STEPS + 1)), "run 2 continues from its checkpoint"
    assert re.search(rf"resumed from .*step_0*{resumed} at step {resumed}$", text, re.M), text[-3000:]

    # read back: each step once, and the second run continues the first exactly (same weights,
    # optimizer state, LR and data position), also over the steps that were done twice
    from megadeep.monitoring.plot import panel_series
    from megadeep.monitoring.records import read_run

    run = read_run(metrics)
    losses = [(r["step"], r["loss"]) for r in run if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), "a step was lost or counted twice"
    assert [s for s, _ in panel_series(run)["loss"]["loss"]] == list(range(1, STEPS + 1))
    _, _, ref = reference
    for (step, loss), (_, ref_loss) in zip(losses, ref):
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), (step, stopped, resumed)
    plot = subprocess.run([sys.executable, "-m", "megadeep", "plot", str(metrics)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert plot.returncode == 0 and "loss.png" in plot.stdout, plot.stderr


def test_mpi_launcher_srun_pmi2_with_mpi4py_trains_the_same(slurm_cluster, reference, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py (and PyPI mpich) are needed for --launcher mpi")
    job_id, log, metrics = submit(slurm_cluster, tmp_path, "mpi", "--launcher", "mpi")
    job = slurm_cluster.wait_job(job_id, timeout=300)
    text = read_log(log)
    assert job["JobState"] == "COMPLETED", (job, text[-3000:])
    check_rank_map(text, "mpi")  # ranks came from MPI_COMM_WORLD, and landed where srun placed them
    losses, (_, _, ref) = step_losses(metrics), reference
    assert [s for s, _ in losses] == [s for s, _ in ref]
    assert [v for _, v in losses] == pytest.approx([v for _, v in ref], rel=1e-5, abs=1e-6)


def test_invalid_layouts_are_refused_before_submission(slurm_cluster, tmp_path):
    queued = slurm_cluster.run("squeue", "-h", "-t", "all").stdout
    for args, says in [
        (["parallel.tp=2", "train.global_batch_size=24", "--gpus-per-node", "3"], "TP group of ranks 2-3"),
        (["parallel.tp=4", "model.n_kv_heads=4", "--gpus-per-node", "2"], "would span nodes"),
        (["parallel.dp=4", "--gpus-per-node", "2"], "world size is 4"),
        (["--gpus-per-node", "2", f"data.cache_dir={tmp_path}/cache"], "data.corpus=shakespeare is not prepared"),
        (["--gpus-per-node", "2", "--prepare-data", "checkpoint.dir=/etc/passwd/c"], "checkpoint.dir='/etc/passwd/c'"),
    ]:
        proc = launch(slurm_cluster, tmp_path, *args, "--nodes", "2", "--cpu", "--submit", "--out", "out")
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()
    assert slurm_cluster.run("squeue", "-h", "-t", "all").stdout == queued


def test_deepspeed_hostfile_from_the_allocation(slurm_cluster, tmp_path):
    out = tmp_path / "hostfile.out"
    slurm_cluster.run("sbatch", "--wait", "--nodes=2", "--ntasks-per-node=2", f"--output={out}",
                      f"--wrap={sys.executable} -m megadeep launch hostfile", cwd=tmp_path, timeout=120)
    assert out.read_text() == "n1 slots=2\nn2 slots=2\n"


def test_a_stopped_rank_ends_the_job_within_the_hang_timeout_naming_it(slurm_cluster, tmp_path):
    timeout = 15
    job_id, log, metrics = submit(slurm_cluster, tmp_path, "hang", "train.steps=100000",
                                  f"train.hang_timeout_s={timeout}", f"checkpoint.dir={tmp_path}/hang/ckpt")
    wait_for(lambda: metrics.exists() and len(step_losses(metrics)) >= 3, job_id, slurm_cluster, log)
    beat = json.loads((tmp_path / "hang" / "ckpt" / ".heartbeat" / "rank_00003.json").read_text())
    os.kill(beat["pid"], signal.SIGSTOP)  # rank 3 (on n2) stops mid-run; the others wait in a collective
    stopped_at = time.time()
    try:
        job = slurm_cluster.wait_job(job_id, timeout=timeout + 90)
    finally:
        try:
            os.kill(beat["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    took, text = time.time() - stopped_at, read_log(log)
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", (job, text[-3000:])
    assert took < timeout + 60, took
    hang = re.search(r"^megadeep: hang: no step finished for 15 s after step (\d+) .*silent: (.*); ending the job$",
                     text, re.M)
    assert hang, text[-3000:]
    # rank 3 is the one named, with its pid and its own last heartbeat: the step the others are stuck after,
    # or the one before when SIGSTOP landed between that step's last collective and rank 3's heartbeat
    named = re.fullmatch(rf"rank 3 \(n2, pid {beat['pid']}, last step (\d+)\)", hang.group(2))
    assert named and int(named.group(1)) in (int(hang.group(1)) - 1, int(hang.group(1))), hang.group(0)
    assert int(hang.group(1)) >= 3


def test_elastic_requeue_onto_one_node_and_back_keeps_the_losses(slurm_cluster, reference, tmp_path):
    """USR1 → requeue; the job comes back on 1 node (TP=2 × DP=1, twice the accumulation), then, after a
    second USR1, on 2 nodes again: the same global batches, so run 0's losses within 1e-5."""
    from megadeep.monitoring.records import read_run

    job_id, log, metrics = submit(slurm_cluster, tmp_path, "elastic")
    logged = lambda: len(step_losses(metrics)) if metrics.exists() else 0  # noqa: E731
    requeueing = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD")
    for nodes, tasks, restart in ((1, 2, 1), (2, 4, 2)):
        wait_for(lambda: logged() >= 3 * restart, job_id, slurm_cluster, log, states=requeueing)
        slurm_cluster.run("scancel", "--signal=USR1", str(job_id))
        wait_for(lambda: read_log(log).count("requeueing job") == restart, job_id, slurm_cluster, log, states=requeueing)
        wait_for(lambda: slurm_cluster.job(job_id)["JobState"] == "PENDING", job_id, slurm_cluster, log, states=requeueing)
        slurm_cluster.run("scontrol", "hold", str(job_id))
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", f"NumNodes={nodes}", f"NumTasks={tasks}")
        slurm_cluster.run("scontrol", "release", str(job_id))
    job = slurm_cluster.wait_job(job_id, timeout=300)
    text = read_log(log)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2", (job, text[-4000:])
    assert "resharded to TP=2 DP=1 PP=1, global batch 8 kept with 2 accumulation step(s)" in text, text[-4000:]
    assert "resharded to TP=2 DP=2 PP=1, global batch 8 kept with 1 accumulation step(s)" in text, text[-4000:]
    losses = [(r["step"], r["loss"]) for r in read_run(metrics) if "loss" in r]
    _, _, ref = reference
    assert [s for s, _ in losses] == [s for s, _ in ref]
    for (step, loss), (_, ref_loss) in zip(losses, ref):
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), step
