"""Hostile inputs and hostile ends (issue 20): every user error is one line and exit 2 before any
process starts; finished work survives a crash after training; no rank outlives its launcher; one run
owns its checkpoint dir; malformed checkpoint metadata is a warning and a fall-back."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megadeep.checkpoint import lock, store
from megadeep.checkpoint.convert import open_source, write_checkpoint
from megadeep.cli import main
from megadeep.errors import CheckpointError, ConfigError
from tests.helpers import ROOT, WORKERS, write_text

TINY = str(ROOT / "configs" / "tiny.yaml")
RUN = """name: harden
model: {{vocab_size: 256, dim: 32, n_layers: 2, n_heads: 4, max_seq_len: 32}}
train: {{seq_len: 32, micro_batch_size: 2, global_batch_size: 4, steps: 3, eval_iters: 1}}
optim: {{warmup_steps: 1}}
data: {{source: bytes, paths: [{text}]}}
deepspeed: {{config: zero0}}
log: {{progress: true}}
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A valid bytes-data run config, and broken files to feed the CLI."""
    d = tmp_path_factory.mktemp("inputs")
    text = write_text(d / "text.txt", n_words=3000)
    f = {"dir": d, "text": text, "cfg": d / "run.yaml", "hf": d / "hf", "ck": d / "ck"}
    f["cfg"].write_text(RUN.format(text=text))
    f["latin1"] = d / "latin1.yaml"
    f["latin1"].write_bytes("name: caf\xe9\n".encode("latin-1"))
    f["dup"] = d / "dup.yaml"
    f["dup"].write_text(RUN.format(text=text) + "train: {steps: 5}\n")
    f["dupjson"] = d / "dup.json"
    f["dupjson"].write_text('{"name": "a", "name": "b"}')
    for name, content in [("ds_latin1.json", b'{"zero_optimization": {"stage": 1}, "note": "\xe9"}'),
                          ("ds_list.json", b'{"zero_optimization": []}'),
                          ("ds_stage.json", b'{"zero_optimization": {"stage": "two"}}')]:
        (d / name).write_bytes(content)
    f["hf"].mkdir()
    (f["hf"] / "config.json").write_text(json.dumps({"model_type": "llama"}))
    f["ck"].mkdir()
    return f


# argv templates ({cfg}, {dir}, ... from the fixture) -> a fragment of the one-line message
INVALID = [
    # train: override syntax, encodings, duplicate keys
    ("train {cfg} data.paths=[a,b --nproc 2", "override 'data.paths=[a,b' is not valid YAML"),
    ("train {cfg} parallel.tp== --nproc 2", "override 'parallel.tp==' is not valid YAML"),
    ("train {cfg} model.dim=*x --nproc 2", "found undefined alias"),
    ("train {cfg} model..dim=3", "is not a dotted key"),
    ("train {cfg} =3", "is not of the form key=value"),
    ("train {latin1} --nproc 2", "is not UTF-8 text"),
    ("train {cfg} deepspeed.config={dir}/ds_latin1.json", "is not UTF-8 text"),
    ("train {cfg} deepspeed.config={dir}/ds_list.json", "must be a JSON object"),
    ("train {cfg} deepspeed.config={dir}/ds_stage.json", "must be an integer 0-3"),
    ("train {dup}", "key 'train' appears twice"),
    ("train {dupjson}", "key 'name' appears twice"),
    ("train {dir}", "(it is a directory)"),
    # train: values the ranks used to crash on
    ("train {cfg} model.ffn_dim=null model.ffn_multiple_of=0", "model.ffn_multiple_of must be at least 1"),
    ("train {cfg} model.n_kv_heads=-2 --nproc 2", "model.n_kv_heads must be at least 1"),
    ("train {cfg} model.n_kv_heads=0", "model.n_kv_heads must be at least 1"),
    ("train {cfg} model.ffn_dim=-384", "model.ffn_dim must be at least 1"),
    ("train {cfg} train.seed=-1", "train.seed must be in [0, 2^32)"),
    ("train {cfg} train.seed=4294967296", "train.seed must be in [0, 2^32)"),
    ("train {cfg} optim.eps=-1", "optim.eps must be positive"),
    ("train {cfg} model.init_std=-1", "model.init_std must be positive"),
    ("train {cfg} model.norm_eps=0", "model.norm_eps must be positive"),
    ("train {cfg} model.rope_theta=-1", "model.rope_theta must be positive"),
    ("train {cfg} model.vocab_size=-5", "model.vocab_size must be ≥ 0"),
    ("train {cfg} train.dist_timeout_s=-1", "train.dist_timeout_s must be positive"),
    ("train {cfg} train.device=cuda", "train.device=cuda but no CUDA device"),
    ("train {cfg} data.source=bytes data.paths=[/nonexistent] --nproc 2", "'/nonexistent' is not a file"),
    ("train {cfg} data.source=tokens data.paths=[/nonexistent]", "'/nonexistent' does not exist"),
    ("train {cfg} data.source=tokens data.tokenizer=/nonexistent.model", "data.tokenizer='/nonexistent.model' does not exist"),
    ("train {cfg} log.metrics_file={dir}", "is a directory; give a file name"),
    ("train {cfg} log.metrics_file=/etc/passwd/m.jsonl", "its directory '/etc/passwd' exists and is not a"),
    ("train {cfg} log.tensorboard_dir=/etc/passwd", "exists and is not a directory"),
    ("train {cfg} log.log_every=0", "log.log_every must be ≥ 1"),
    ("train {cfg} checkpoint.dir=/etc/passwd", "checkpoint.dir='/etc/passwd' exists and is not a directory"),
    ("train {cfg} checkpoint.dir=/proc/megadeep/ck", "checkpoint.dir='/proc/megadeep/ck' is not writable"),
    ("train {cfg} checkpoint.save_minutes=inf", "checkpoint.save_minutes must be a finite number"),
    ("train {cfg} parallel.partition_method=type:[ parallel.pp=2 --nproc 2", "is not a valid regex"),
    ("train {cfg} parallel.partition_method=type:Conv parallel.pp=2 --nproc 2", "matches no layer type"),
    ("train {cfg} parallel.partition_method=balanced", "parallel.partition_method must be one of"),
    ("train {cfg} parallel.pipeline_checkpoint_interval=-1", "must be ≥ 0"),
    ("train {cfg} optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("train {cfg} optim.lr=nan", "optim.lr must be a finite number"),
    ("train {cfg} optim.weight_decay=-0.1", "optim.weight_decay must be ≥ 0"),
    ("train {cfg} data.val_fraction=.nan", "data.val_fraction must be a finite number"),
    ("train {cfg} train.eval_iters=0", "train.eval_iters must be ≥ 1"),
    ("train {cfg} train.eval_every=-1", "train.eval_every must be ≥ 0"),
    ("train {cfg} name=../../escape", "name='../../escape' must be"),
    ("train {cfg} name=a/b", "name='a/b' must be"),
    ("train {cfg} --nproc x", "argument --nproc: invalid int value: 'x'"),
    ("train {cfg} --nproc 0", "--nproc must be ≥ 1"),
    ("train {cfg} --bogus", "unrecognized arguments: --bogus"),
    ("train", "the following arguments are required"),
    (f"train {TINY} parallel.tp=3 --nproc 4", "world size 4 is not divisible"),
    # launch slurm: nothing is written
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm name=../../escape", "name='../../escape' must be"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm --time 1h", "--time '1h' is not a SLURM time"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm --cpus-per-task -1", "--cpus-per-task must be ≥ 0"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm --partition gpu;reboot", "--partition 'gpu;reboot'"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm --container-image i --container-mounts x",
     "is not SRC:DST"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm --workdir /nonexistent", "is not a directory"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm --signal-grace 0", "--signal-grace must be ≥ 1"),
    ("launch slurm {cfg} --nodes x --gpus-per-node 2", "--nodes must be N or MIN-MAX"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm data.paths=[a", "is not valid YAML"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --out {dir}/slurm optim.lr=inf", "optim.lr must be a finite"),
    ("launch slurm {cfg} --nodes 1 --gpus-per-node 2 --launcher pdsh", "argument --launcher: invalid choice"),
    # ckpt: arguments are checked before anything is read or written
    ("ckpt info /nonexistent", "path '/nonexistent' is not a directory"),
    ("ckpt info {text}", "is not a directory"),
    ("ckpt info", "the following arguments are required: path"),
    ("ckpt frobnicate x", "invalid choice: 'frobnicate'"),
    ("ckpt reshard {ck} {dir}/out --tp 0", "--tp must be ≥ 1, got 0"),
    ("ckpt reshard {ck} {dir}/out --tp 1 --pp 2", "offline resharding writes pp=1 only"),
    ("ckpt reshard {ck} /etc/passwd --tp 1", "dst='/etc/passwd' exists and is not a directory"),
    ("ckpt reshard {ck} {dir}/out --tp two", "argument --tp: invalid int value"),
    ("ckpt export-hf {ck} {dir}/hf_out --dtype int8", "argument --dtype: invalid choice: 'int8'"),
    ("ckpt export-hf {ck} {dir}/hf_out --tokenizer /nonexistent.model", "--tokenizer '/nonexistent.model' does not exist"),
    ("ckpt export-hf /nonexistent {dir}/hf_out", "src '/nonexistent' is not a directory"),
    ("ckpt import-hf {hf} {dir}/imported --tp -1", "--tp must be ≥ 1, got -1"),
    ("ckpt import-hf {hf} {dir}/imported --tp 0", "--tp must be ≥ 1, got 0"),
    ("ckpt import-hf {dir} {dir}/imported", "has no config.json"),
    ("ckpt import-hf {hf} /etc/passwd", "dst='/etc/passwd' exists and is not a directory"),
    # plan
    ("plan --seq-len 0 --global-batch 8 --size 7B", "--seq-len must be ≥ 1"),
    ("plan --seq-len 8 --global-batch 0 --size 7B", "--global-batch must be ≥ 1"),
    ("plan --seq-len 8 --global-batch 8 --size 7B --top 0", "--top must be ≥ 1"),
    ("plan --seq-len 8 --global-batch 8 --size 9B", "--size 9B is not a preset"),
    ("plan --seq-len 8 --global-batch 8 --size 7B --model {cfg}", "not both"),
    ("plan --seq-len 8 --global-batch 8 --model {dup}", "key 'train' appears twice"),
    ("plan --seq-len 8 --global-batch 8 --model {latin1}", "is not UTF-8 text"),
    ("plan --seq-len 8 --global-batch 8 --size 7B --host-gib inf", "--host-gib must be positive"),
    ("plan --seq-len 8 --global-batch 8 --size 7B --intra-gbps -1", "--intra-gbps must be ≥ 0"),
    ("plan --seq-len 8 --global-batch 8 --size 7B --out /etc/passwd", "--out='/etc/passwd' exists and is not"),
    ("plan --seq-len 8 --global-batch 8 --size 7B --gpu Z80", "argument --gpu: invalid choice"),
    ("plan --seq-len x --global-batch 8 --size 7B", "argument --seq-len: invalid int value"),
    # memory
    ("memory {cfg} --json {dir}", "--json='{dir}' is a directory"),
    ("memory {cfg} optim.lr=inf", "optim.lr must be a finite number"),
    ("memory {cfg} --nproc 0", "--nproc must be ≥ 1"),
    ("memory {cfg} model.dim=*x", "found undefined alias"),
    ("memory {cfg} parallel.pp=2 --nproc 2", "measure with parallel.pp=1"),
]


def argv(template: str, f: dict) -> list[str]:
    return template.format(**{k: str(v) for k, v in f.items()}).split()


def test_the_table_is_big_and_covers_every_command():
    assert len(INVALID) >= 60
    assert {t.split()[0] for t, _ in INVALID} == {"train", "launch", "ckpt", "plan", "memory"}


@pytest.mark.parametrize("template, says", INVALID, ids=[t for t, _ in INVALID])
def test_user_error_is_one_line_exit_2_before_any_process(template, says, files, capsys, monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    before = set(os.listdir(files["dir"]))
    start = time.perf_counter()
    try:
        code = main(argv(template, files))
    except SystemExit as e:  # argparse
        code = e.code
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("megadeep: error: ") and "Traceback" not in err, err
    assert says.format(**{k: str(v) for k, v in files.items()}) in err, err
    assert elapsed < 2.0, elapsed
    assert {p.pid for p in psutil.Process().children(recursive=True)} == children
    assert set(os.listdir(files["dir"])) == before  # nothing written (no runs/, no slurm/, no checkpoint)


@pytest.mark.parametrize("template", ["train {latin1}", "train {cfg} data.paths=[a,b --nproc 2",
                                      "ckpt import-hf {hf} {dir}/x --tp 0", "plan --seq-len 8 --global-batch 8 --size 9B"])
def test_user_error_in_a_fresh_process(template, files):
    """The same, for real: the interpreter prints no traceback either, and starts no rank."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megadeep", *argv(template, files)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "torch.distributed" not in proc.stdout + proc.stderr
    assert elapsed < 2.0, elapsed


# --- finished work survives; no update is a failure ---------------------------------------------
def faulty(mode: str, files: dict, *overrides: str):
    return subprocess.run([sys.executable, str(WORKERS / "faulty.py"), mode, str(files["cfg"]), *overrides],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_eval_crash_keeps_the_final_checkpoint_which_resumes_and_falls_back(files, tmp_path):
    ck = tmp_path / "ck"
    crashed = faulty("eval_crash", files, f"checkpoint.dir={ck}", "train.steps=3")
    assert crashed.returncode != 0 and "injected: evaluation failed" in crashed.stderr
    assert store.latest(ck) == ck / "step_00000003" and not (ck / lock.LOCK).exists()
    assert open_source(ck).step == 3
    resumed = subprocess.run([sys.executable, "-m", "megadeep", "train", str(files["cfg"]), f"checkpoint.dir={ck}",
                              "train.steps=4"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ck / 'step_00000003'} at step 3" in resumed.stdout
    # the newest checkpoint's manifest is valid JSON of the wrong shape: the ranks fall back, with a warning
    (ck / "step_00000004" / store.MANIFEST).write_text("[]")
    again = subprocess.run([sys.executable, "-m", "megadeep", "train", str(files["cfg"]), f"checkpoint.dir={ck}",
                            "train.steps=5"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step_00000004 is unusable" in again.stderr and "not an object" in again.stderr
    assert f"resumed from {ck / 'step_00000003'} at step 3" in again.stdout


def test_a_run_that_applied_no_update_fails(files, tmp_path):
    proc = faulty("nan", files, "train.steps=2", "train.max_consecutive_skips=8")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "megadeep: error: no update was applied: all 2 steps of this run had a non-finite loss or gradient "
        "and were skipped; lower optim.lr or fix the data")


# --- the launcher's death ends its ranks; one run per checkpoint dir -----------------------------
def start_run(files: dict, ck: Path, tmp: Path, tag: str):
    metrics = tmp / f"{tag}.jsonl"
    log = open(tmp / f"{tag}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "megadeep", "train", str(files["cfg"]), f"checkpoint.dir={ck}",
                             f"log.metrics_file={metrics}", "train.steps=1000000", "optim.warmup_steps=0", "--nproc", "2"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # training, not starting up
        assert proc.poll() is None and time.time() < deadline, (tmp / f"{tag}.log").read_text()[-3000:]
        time.sleep(0.5)
    tree = psutil.Process(proc.pid).children(recursive=True)
    return proc, tree, (tmp / f"{tag}.log")


def survivors(pids, within: float = 10.0) -> list[int]:
    """Of ``pids``, those still running ``within`` seconds from now (zombies count as gone)."""
    deadline, alive = time.time() + within, list(pids)
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [pid for pid in alive if running(pid)]
    return alive


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("victim, sig", [("cli", signal.SIGTERM), ("cli", signal.SIGKILL), ("agent", signal.SIGKILL)])
def test_killing_the_launcher_leaves_no_rank_and_the_dir_locked_against_a_second_run(victim, sig, files, tmp_path):
    ck = tmp_path / "ck"
    if victim == "agent":  # a stale lock, as a SIGKILLed launcher leaves it: taken over with a warning
        dead = subprocess.Popen(["true"])
        dead.wait()
        ck.mkdir()
        (ck / lock.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}))
    proc, tree, log = start_run(files, ck, tmp_path, "first")
    ranks = [p for p in tree if "megadeep.launch.local" not in " ".join(p.cmdline())]
    agent = [p for p in tree if "megadeep.launch.local" in " ".join(p.cmdline())]
    assert len(agent) == 1 and len(ranks) >= 2, [p.cmdline() for p in tree]
    if victim == "agent":
        assert f"taking over the stale lock {ck / lock.LOCK} of a run that is gone (pid {dead.pid} on host" in log.read_text()
    if victim == "cli" and sig == signal.SIGTERM:
        second = subprocess.run([sys.executable, "-m", "megadeep", "train", str(files["cfg"]), f"checkpoint.dir={ck}",
                                 "--nproc", "2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"is in use by another run (pid {proc.pid} on host {socket.gethostname()}" in second.stderr
    (psutil.Process(proc.pid) if victim == "cli" else agent[0]).send_signal(sig)
    alive = survivors([proc.pid, *(p.pid for p in tree)])
    proc.wait(timeout=30)
    assert alive == [], [psutil.Process(p).cmdline() for p in alive]
    if sig == signal.SIGTERM:
        assert not (ck / lock.LOCK).exists()  # released on the way out


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, caplog):
    path = lock.acquire(tmp_path)
    owner = json.loads(path.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({**owner, "pid": sleeper.pid, "start": lock._start_ticks(sleeper.pid)}))
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {sleeper.pid} on host {socket.gethostname()}"):
            lock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    for stale in (json.dumps({**owner, "pid": sleeper.pid}), "garbage", json.dumps({**owner, "start": "1"})):
        path.write_text(stale)  # dead pid; unreadable; our own pid but another process's start time
        with caplog.at_level(logging.WARNING, logger="megadeep.checkpoint"):
            caplog.clear()
            assert lock.acquire(tmp_path) == path
        assert "taking over the stale lock" in caplog.text
        assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release(path)
    assert not path.exists()
    # another host cannot be checked: refused, unless it is an earlier start of this same SLURM job
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": "77"}))
    with pytest.raises(ConfigError, match="pid 1 on host elsewhere, SLURM job 77"):
        lock.acquire(tmp_path)
    os.environ["SLURM_JOB_ID"] = "77"
    try:
        assert lock.acquire(tmp_path) == path
    finally:
        del os.environ["SLURM_JOB_ID"]


# --- malformed checkpoint metadata: a warning and a fall-back ------------------------------------
def write_step(root: Path, step: int) -> Path:
    import torch

    from megadeep.checkpoint.convert import canonical_specs
    from megadeep.config.schema import ModelConfig, RunConfig
    from megadeep.config.load import to_dict

    m = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=4, max_seq_len=32)
    specs = canonical_specs(m)
    meta = {"step": step, "consumed_samples": 4 * step, "layout": {"tp": 1, "pp": 1, "dp": 1}, "zero_stage": 0,
            "precision": "fp32", "config": to_dict(RunConfig(model=m)), "optimizer": None, "rng": False}
    return write_checkpoint(root, meta, specs, lambda kind, name: torch.full(specs[name].shape, float(step)),
                            ("model",), 1, m.padded_vocab(1))


def _json_edit(rel: str, edit):
    def apply(ckpt: Path):
        data = json.loads((ckpt / rel).read_text())
        (ckpt / rel).write_text(json.dumps(edit(data)))
    return apply


def _meta_edit(edit):
    """Change meta.json and re-seal its manifest entry, so only the content is wrong, not the hash."""
    def apply(ckpt: Path):
        meta = edit(json.loads((ckpt / store.META).read_text()))
        data = json.dumps(meta).encode()
        (ckpt / store.META).write_bytes(data)
        _json_edit(store.MANIFEST, lambda m: {**m, "files": {**m["files"], store.META: {
            "sha256": store.sha256_bytes(data), "bytes": len(data)}}})(ckpt)
    return apply


MALFORMED = {
    "manifest is a list": lambda c: (c / store.MANIFEST).write_text("[]"),
    "manifest is binary": lambda c: (c / store.MANIFEST).write_bytes(b"\xff\xfe\x00junk"),
    "manifest sha256 key mangled": _json_edit(store.MANIFEST, lambda m: {**m, "files": {
        k: {"sha256x": v["sha256"], "bytes": v["bytes"]} for k, v in m["files"].items()}}),
    "manifest files is a string": _json_edit(store.MANIFEST, lambda m: {**m, "files": "all"}),
    "manifest entry escapes": _json_edit(store.MANIFEST, lambda m: {**m, "files": {
        **m["files"], "../../etc/passwd": {"sha256": "0", "bytes": 1}}}),
    "meta is a list": _meta_edit(lambda m: [m]),
    "meta step is a string": _meta_edit(lambda m: {**m, "step": "three"}),
    "meta without layout": _meta_edit(lambda m: {k: v for k, v in m.items() if k != "layout"}),
    "meta layout tp 0": _meta_edit(lambda m: {**m, "layout": {"tp": 0, "pp": 1, "dp": 1}}),
    "meta params is a list": _meta_edit(lambda m: {**m, "params": []}),
    "meta param spec mangled": _meta_edit(lambda m: {**m, "params": {n: {"shape": "big"} for n in m["params"]}}),
    "meta model dim is text": _meta_edit(lambda m: {**m, "config": {**m["config"], "model": {
        **m["config"]["model"], "dim": "wide"}}}),
    "meta lists no params": _meta_edit(lambda m: {**m, "params": {}}),
}


@pytest.mark.parametrize("damage", sorted(MALFORMED))
def test_malformed_checkpoint_falls_back_with_a_warning(damage, tmp_path, caplog):
    good, bad = write_step(tmp_path, 1), write_step(tmp_path, 2)
    MALFORMED[damage](bad)
    with caplog.at_level(logging.WARNING, logger="megadeep.checkpoint"):
        ckpt = open_source(tmp_path)
    assert ckpt.path == good and ckpt.step == 1
    assert f"checkpoint {bad} is unusable" in caplog.text
    with pytest.raises(CheckpointError):  # named exactly, it is refused (one line, no traceback)
        open_source(bad)


@pytest.mark.parametrize("latest", [b"\xff\xd8\xff\xe0binary", b"../../etc\n", b"step_00000009\n", b""])
def test_bad_latest_falls_back_and_ckpt_info_lists_the_valid_step(latest, tmp_path, caplog, capsys):
    write_step(tmp_path, 1)
    newest = write_step(tmp_path, 2)
    (tmp_path / store.LATEST).write_bytes(latest)
    assert store.latest(tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="megadeep.checkpoint"):
        assert main(["ckpt", "info", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(newest) and info["step"] == 2 and info["verified"] and info["params"] > 0
    assert "names no usable checkpoint; using the newest usable one" in caplog.text


def test_a_checkpoint_without_tensors_is_never_verified(tmp_path, capsys):
    ckpt = write_step(tmp_path, 1)
    (ckpt / "model-tp00-pp00.safetensors").unlink()
    _json_edit(store.MANIFEST, lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k == store.META}})(ckpt)
    assert main(["ckpt", "info", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no tensor" in err and "verified" not in err


def test_only_rank_0_locks_and_ranks_of_a_locking_launcher_do_not(tmp_path, monkeypatch):
    """Under srun/torchrun without megadeep's launcher, global rank 0 takes the lock; the ranks
    ``megadeep train --nproc`` starts inherit the launcher's (MEGADEEP_CKPT_LOCK) and take none."""
    with lock.holding(str(tmp_path), rank=1):
        assert not (tmp_path / lock.LOCK).exists()
    with lock.holding(str(tmp_path), rank=0):
        held = tmp_path / lock.LOCK
        assert held.exists() and os.environ[lock.HELD_ENV] == str(held)
        with lock.holding(str(tmp_path), rank=0):  # a rank started under this launcher
            assert json.loads(held.read_text())["pid"] == os.getpid()
        assert held.exists()  # the inner one released nothing
    assert not held.exists() and lock.HELD_ENV not in os.environ
