"""``megadeep launch slurm|hostfile``: batch scripts and hostfiles for multi-node runs.

Every check runs before anything is written or submitted, so a bad layout costs a second, not a
place in the queue.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from megadeep.errors import ConfigError


def cmd_slurm(args: argparse.Namespace) -> int:
    from megadeep.config import dump_json, load_config, resolve
    from megadeep.launch.placement import check_placement, planned_rank_map
    from megadeep.launch.slurm import SlurmJob, check_before_submit, job_config, parse_nodes, render, submit
    from megadeep.training.run import resolve_run

    workdir = Path(args.workdir).resolve()
    containerised = bool(args.container_image or args.apptainer)
    nodes, max_nodes = parse_nodes(args.nodes)
    job = SlurmJob(
        nodes=nodes, max_nodes=max_nodes, per_node=args.gpus_per_node, time=args.time, signal_grace_s=args.signal_grace,
        cpu=args.cpu, launcher=args.launcher, partition=args.partition, account=args.account,
        cpus_per_task=args.cpus_per_task, container_image=args.container_image, apptainer=args.apptainer,
        container_mounts=args.container_mounts, workdir=str(workdir),
        python=args.python or ("python" if containerised else sys.executable),
    )
    job.check()
    given = load_config(args.config, args.overrides)
    world = job.nodes * job.per_node
    try:
        cfg = resolve(given, world)
        run = resolve_run(cfg, "cpu" if job.cpu else "cuda")
    except ConfigError as e:
        raise ConfigError(f"for {job.nodes} node(s) × {job.per_node} = {world} ranks: {e}") from None
    layout = run.layout
    check_placement(layout, job.nodes, job.per_node)
    for n in job.node_counts[1:]:  # elastic: every count a requeue may bring must keep the global batch
        try:
            check_placement(resolve_run(resolve(given, n * job.per_node), run.device_type).layout, n, job.per_node)
        except ConfigError as e:
            raise ConfigError(f"--nodes={job.nodes_spec}: on {n} node(s) × {job.per_node} = "
                              f"{n * job.per_node} ranks: {e}") from None

    out = Path(args.out or f"runs/{cfg.name}/slurm")
    out = out if out.is_absolute() else workdir / out
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = str(out / "checkpoints")
        print(f"note: checkpoint.dir was not set; the time-limit checkpoint goes to {cfg.checkpoint.dir}")
    check_before_submit(job, cfg, args.prepare_data)
    print(planned_rank_map(layout, job.nodes, job.per_node))
    out.mkdir(parents=True, exist_ok=True)
    config_path, script = out / "config.json", out / "job.sbatch"
    dump_json(job_config(cfg, given), config_path)
    command = shlex.join(["megadeep", *sys.argv[1:]]) if sys.argv[1:2] == ["launch"] else "megadeep launch slurm"
    script.write_text(render(job, cfg, str(config_path), str(out / "slurm-%j.out"), command, args.prepare_data))
    print(f"wrote {script} (run config {config_path})")
    if args.submit:
        print(f"submitted job {submit(script)}; log {out}/slurm-<jobid>.out")
    else:
        print(f"submit with: sbatch {script}")
    return 0


def cmd_hostfile(args: argparse.Namespace) -> int:
    from megadeep.launch.env import slurm_hostnames
    from megadeep.launch.hostfile import allocation_hosts, deepspeed_hostfile, default_slots

    hosts = slurm_hostnames(args.nodelist) if args.nodelist else allocation_hosts()
    text = deepspeed_hostfile(hosts, args.slots or default_slots())
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: {len(hosts)} host(s)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    from megadeep.launch.examples import write_examples

    root = Path(__file__).resolve().parents[2]
    for path in write_examples(root, Path(args.out)):
        print(f"wrote {path}")
    return 0


def add_launch(sub) -> None:
    launch = sub.add_parser("launch", help="multi-node launch: SLURM batch scripts, DeepSpeed hostfiles")
    kinds = launch.add_subparsers(dest="launch_kind", required=True)

    p = kinds.add_parser("slurm", help="write (and with --submit, submit) an sbatch script for a run config",
                         description="Validate the run for nodes × GPUs ranks, print the rank map, write "
                                     "runs/NAME/slurm/{job.sbatch,config.json}.")
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=8")
    p.add_argument("--nodes", required=True, help="N, or MIN-MAX for an elastic allocation (SLURM's range form)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node (with --cpu: CPU slots)")
    p.add_argument("--time", default="01:00:00", help="SLURM time limit (default 01:00:00)")
    p.add_argument("--signal-grace", type=int, default=180,
                   help="seconds before the time limit at which ranks get USR1 to save and requeue (default 180)")
    p.add_argument("--cpu", action="store_true", help="CPU ranks over gloo, no GPU request (test clusters)")
    p.add_argument("--launcher", default="srun", choices=["srun", "mpi"],
                   help="srun: ranks from SLURM variables (default); mpi: srun --mpi=pmi2, ranks from mpi4py")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--cpus-per-task", type=int, default=0)
    p.add_argument("--container-image", default="", help="pyxis/enroot image, e.g. a squashfs on shared storage")
    p.add_argument("--apptainer", default="", help="Apptainer image (.sif) to run the ranks in")
    p.add_argument("--container-mounts", nargs="*", default=[], metavar="SRC:DST",
                   help="extra mounts for the container (the working directory is always mounted)")
    p.add_argument("--python", default="", help="python on the nodes (default: this one, or `python` in a container)")
    p.add_argument("--workdir", default=".", help="directory the job runs in (default: here)")
    p.add_argument("--out", default="", help="where the script, config and logs go (default runs/NAME/slurm)")
    p.add_argument("--submit", action="store_true", help="sbatch the script after writing it")
    p.add_argument("--prepare-data", action="store_true",
                   help="the job prepares data.corpus before the ranks start (default: it must be prepared already)")
    p.set_defaults(func=cmd_slurm)

    h = kinds.add_parser("hostfile", help="a DeepSpeed hostfile from the SLURM allocation")
    h.add_argument("--nodelist", default="", help="SLURM node list (default: this job's SLURM_JOB_NODELIST)")
    h.add_argument("--slots", type=int, default=0, help="ranks per host (default: GPUs per node of the job)")
    h.add_argument("-o", "--output", default="", help="write here instead of stdout")
    h.set_defaults(func=cmd_hostfile)

    e = kinds.add_parser("examples", help="(re)write the example entry scripts of the repository's launch/")
    e.add_argument("--out", default="launch", help="directory (default: launch)")
    e.set_defaults(func=cmd_examples)
