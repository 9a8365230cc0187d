"""Raw text → token shards on datatrove: five stages (see :mod:`megadeep.data.steps`), run by datatrove's
local executor (``workers`` processes) or as chained SLURM array jobs, with the same output either way.

What a task does is fixed by the input files and ``tasks`` (input files are dealt to tasks like cards),
never by how many run at once, so 1 worker, N workers and a SLURM job write identical shards. The
executors mark each finished task (datatrove's completion files under ``OUT/.work/logs``): a rerun with
the same inputs and settings skips them, so a killed or preempted run resumes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megadeep.data.cleaning import NORMALIZATIONS, QualityRules, normalize, quality_failure
from megadeep.data.dedup import MAX_PERM, DedupSettings
from megadeep.data.pii import scrub
from megadeep.data.reader import FORMATS, InputReader, check_columns, expand_inputs
from megadeep.data.shards import MANIFEST
from megadeep.data.tokenizer import open_tokenizer, sha256_file
from megadeep.errors import DataError

STAGES = ("read", "normalize", "quality", "pii", "dedup_signature", "dedup_index", "tokenize", "write")
MAX_TASKS = 100_000


@dataclass
class PreprocessSettings:
    json_field: str = "text"  # JSON-lines field / Parquet column that holds the document (--text-field)
    format: str = "auto"  # auto (by file suffix) | text (a file is a document) | jsonl | parquet
    normalization: str = "NFC"  # NFC | NFKC | none
    max_doc_bytes: int = 16 << 20  # a larger document (or JSON line) is dropped unread
    quality: QualityRules = field(default_factory=QualityRules)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    pii: bool = True
    shard_tokens: int = 1 << 26  # tokens per shard file (shards are cut per task)
    tasks: int = 0  # pipeline tasks over the input files; 0: one per file. Fixes the output, unlike workers
    workers: int = 0  # local worker processes; 0: one per CPU core
    batch_bytes: int = 1 << 20  # text per SentencePiece call

    def check(self) -> None:
        """Refuses settings that are wrong or absurd before any work starts."""
        d = self.dedup
        if self.format not in FORMATS:
            raise DataError(f"format must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if self.normalization not in NORMALIZATIONS:
            raise DataError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got '{self.normalization}'")
        if not 0.0 < d.threshold <= 1.0:
            raise DataError(f"dedup.threshold is a Jaccard similarity in (0, 1], got {d.threshold}")
        if not (1 <= d.ngram <= 64 and 16 <= d.num_perm <= MAX_PERM):
            raise DataError(f"dedup.ngram must be in [1, 64] and dedup.num_perm in [16, {MAX_PERM}], "
                            f"got {d.ngram} and {d.num_perm}")
        if not (1 <= self.shard_tokens <= 1 << 40 and 1 <= self.max_doc_bytes <= 1 << 31
                and 1 <= self.batch_bytes <= 1 << 30):
            raise DataError("shard_tokens, max_doc_bytes and batch_bytes must be ≥ 1 (and at most 2^40, 2^31, 2^30)")
        if not (0 <= self.tasks <= MAX_TASKS and 0 <= self.workers <= 4096):
            raise DataError(f"tasks must be in [0, {MAX_TASKS}] and workers in [0, 4096]")

    def result_settings(self) -> dict:
        """The settings that decide the output (not how the work is spread over processes)."""
        d = asdict(self)
        for key in ("workers", "batch_bytes"):
            d.pop(key)
        return d


@dataclass
class SlurmOptions:
    """How ``--slurm`` submits the stages (they do not change the output)."""
    partition: str = ""
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 0  # 0: the cluster's default
    max_parallel: int = -1  # array tasks running at once per stage; -1: no limit
    sbatch_args: dict = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_datatrove():
    """datatrove logs every task to stderr at INFO and to a file; keep only the per-task log files
    (``OUT/.work/logs/<stage>/logs``) and errors on stderr. (Also fewer loguru sinks: each ``add`` costs
    ~20 ms, which is most of a small task's time.)"""
    import datatrove.executor.base as base
    import datatrove.utils.logging as dlog
    from loguru import logger

    original_add, original_default = base.add_task_logger, dlog.setup_default_logger
    sinks: dict = {}

    def setup_default_logger():  # datatrove calls this when a task ends: drop its file sink
        if "file" in sinks:
            logger.remove(sinks.pop("file"))
        if "stderr" not in sinks:
            logger.remove()
            sinks["stderr"] = logger.add(sys.stderr, level="ERROR", backtrace=False, diagnose=False)

    def add_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
        setup_default_logger()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        sinks["file"] = logger.add(logfile, level="DEBUG", colorize=False, backtrace=False, diagnose=False)
        return logfile

    base.add_task_logger, dlog.setup_default_logger = add_task_logger, setup_default_logger
    setup_default_logger()
    try:
        yield
    finally:
        base.add_task_logger, dlog.setup_default_logger = original_add, original_default
        original_default()


def _prepare_out_dir(out: Path, fingerprint: dict, overwrite: bool) -> None:
    """A new or empty ``out``, or the working directory of an unfinished run of the same job (resumed).
    Anything else needs ``--overwrite``, which clears megadeep's files only."""
    from megadeep.data.steps import Work

    work = Work(out)
    saved = work.root / "job.json"
    if out.exists() and any(out.iterdir()):
        resumable = not (out / MANIFEST).exists() and saved.is_file() and saved.read_text() == json.dumps(fingerprint, indent=1) + "\n"
        if overwrite:
            shutil.rmtree(work.root, ignore_errors=True)
            for p in out.iterdir():
                if p.name.startswith("shard_") or p.name in (MANIFEST, "tokenizer.model", "tokenizer.json",
                                                             "tokenizer_config.json"):
                    p.unlink()
        elif not resumable:
            why = " (it holds a finished dataset)" if (out / MANIFEST).exists() else (
                " (it holds an unfinished run with other inputs or settings)" if saved.is_file() else "")
            raise DataError(f"output directory {out} is not empty; pass --overwrite or choose another --out{why}")
    work.root.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(fingerprint, indent=1) + "\n")


def _stages(paths: list[Path], out: Path, tokenizer: Path, s: PreprocessSettings):
    """(name, tasks, pipeline) of each stage."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
    from datatrove.pipeline.writers import JsonlWriter

    from megadeep.data import steps

    work = steps.Work(out)
    tasks = s.tasks or len(paths)
    paths_file = work.root / "inputs.txt"
    paths_file.write_text("".join(str(p).lstrip("/") + "\n" for p in paths))
    config = steps.minhash_config(s.dedup)
    header = {"inputs": [str(p) for p in paths], "tasks": tasks, "settings": s.result_settings()}
    stages = [
        ("clean", tasks, [
            InputReader(str(paths_file), s.format, s.json_field, s.max_doc_bytes),
            steps.Clean(work, s),
            JsonlWriter(str(work.clean), output_filename="${rank}.jsonl", compression=None, expand_metadata=False),
            steps.Signatures(work, s)]),
        ("buckets", config.num_buckets, [MinhashDedupBuckets(str(work.sigs), str(work.buckets), config=config)]),
        ("clusters", 1, [steps.Clusters(work, s, tasks)]),
        ("tokenize", tasks, [steps.ReadClean(work), steps.DropDuplicates(work),
                             steps.TokenShards(work, str(tokenizer), s)]),
        ("manifest", 1, [steps.Manifest(work, str(tokenizer), tasks, header)]),
    ]
    if not s.dedup.near:
        stages.pop(1)
    return work, stages


def _start_method() -> str:
    """fork (workers start in milliseconds, with everything imported) unless this process runs other
    non-daemon threads, which fork could copy mid-lock; then forkserver. (Daemon threads are the
    previous stage's pool handlers, idle.)"""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    return "forkserver" if others else "fork"


def preprocess(inputs: list[str], out_dir: str | Path, tokenizer: str | Path, s: PreprocessSettings,
               overwrite: bool = False, slurm: SlurmOptions | None = None) -> dict:
    """Run the pipeline over ``inputs`` into ``out_dir``; returns the manifest (also written there).
    With ``slurm``, submits the stages as dependent array jobs and returns their job ids instead."""
    import time

    s.check()
    start = time.perf_counter()
    paths = expand_inputs(inputs)
    if not paths:
        raise DataError("no input files")
    if s.tasks > len(paths):
        raise DataError(f"tasks={s.tasks} but there are only {len(paths)} input files; a task reads whole files")
    check_columns(paths, s.format, s.json_field)
    tok = open_tokenizer(tokenizer)  # refuses a missing or corrupt model in one line, before any work
    out = Path(out_dir).resolve()
    fingerprint = {"inputs": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths],
                   "tokenizer": sha256_file(tok.path), "settings": s.result_settings()}
    _prepare_out_dir(out, fingerprint, overwrite)
    work, stages = _stages(paths, out, tok.path, s)
    if slurm is not None:
        return _submit(work, stages, slurm)
    from datatrove.executor import LocalPipelineExecutor

    workers = s.workers or os.cpu_count() or 1
    stage_wall = {}
    with _quiet_datatrove():
        for name, tasks, pipeline in stages:
            stage_start = time.perf_counter()
            ex = LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                                       logging_dir=str(work.logs / name), start_method=_start_method())
            ex.run()
            if missing := ex.get_incomplete_ranks():
                raise DataError(f"preprocessing stage {name}: tasks {missing[:10]} did not finish; "
                                f"see {work.logs / name / 'logs'}; rerun the same command to resume")
            stage_wall[name] = round(time.perf_counter() - stage_start, 3)
    manifest = json.loads((out / MANIFEST).read_text())
    # wall time per datatrove stage (this run only, not in the file): what the stage barriers cost
    manifest["stats"].update(workers=workers, wall_seconds=round(time.perf_counter() - start, 3),
                             stage_wall_seconds=stage_wall)
    return manifest


def _submit(work, stages, o: SlurmOptions) -> dict:
    """One array job per stage, each depending on the one before (afterok), logs per task under
    ``OUT/.work/logs/<stage>``; completed tasks are not resubmitted. The job finds datatrove's
    ``launch_pickled_pipeline`` through this Python's bin directory on PATH (and megadeep through the
    submitting environment, which sbatch exports)."""
    import subprocess

    from datatrove.executor import SlurmPipelineExecutor

    class Executor(SlurmPipelineExecutor):
        def get_sbatch_args(self, max_array: int = 1) -> dict:
            """No ``--partition``/``--mem-per-cpu`` line when not set: the cluster's defaults apply
            (datatrove would write a bare ``#SBATCH --partition``)."""
            args = super().get_sbatch_args(max_array)
            for key in ("partition", "mem-per-cpu"):
                if args[key] in ("", "0G"):
                    del args[key]
            return args

        def launch_merge_stats(self):
            """Not submitted: megadeep's manifest stage sums the counts (datatrove's merge job also
            asks for 1G per CPU, which a cluster without memory accounting refuses)."""

    env = f"export PATH={Path(sys.executable).parent}:$PATH"
    jobs, previous = {}, None
    with _quiet_datatrove():
        for name, tasks, pipeline in stages:
            ex = Executor(
                pipeline, tasks=tasks, time=o.time, partition=o.partition, cpus_per_task=o.cpus_per_task,
                mem_per_cpu_gb=o.mem_per_cpu_gb, workers=o.max_parallel, job_name=f"megadeep-data-{name}",
                qos="", env_command=env, logging_dir=str(work.logs / name), sbatch_args=o.sbatch_args,
                depends_job_id=previous, mail_type="NONE")
            try:
                ex.launch_job()
            except (subprocess.CalledProcessError, FileNotFoundError) as e:
                raise DataError(f"submitting the {name} stage with sbatch failed ({e}); "
                                f"see {work.logs / name / 'launch_script.slurm'}") from None
            jobs[name] = ex.job_id  # -1: every task of the stage already finished
            previous = None if str(ex.job_id) == "-1" else str(ex.job_id)
    return {"jobs": jobs, "out": str(work.out)}


def clean_documents(inputs: list[str], s: PreprocessSettings) -> Iterator[str]:
    """The documents that pass reading, normalisation and the quality rules, PII-scrubbed, in input order
    (in this process: what a tokenizer trains on)."""
    s.check()
    reader = InputReader("", s.format, s.json_field, s.max_doc_bytes)
    for path in expand_inputs(inputs):
        for doc in reader.read_file(str(path)):
            if doc.metadata.get("drop"):
                continue
            text = normalize(doc.text, s.normalization)
            if quality_failure(text, s.quality) is None:
                yield scrub(text)[0] if s.pii else text


def tokenizer_sample(inputs: list[str], s: PreprocessSettings, max_bytes: int) -> Iterator[str]:
    """The first ``max_bytes`` of :func:`clean_documents`."""
    taken = 0
    for text in clean_documents(inputs, s):
        yield text
        taken += len(text)
        if taken >= max_bytes:
            return
