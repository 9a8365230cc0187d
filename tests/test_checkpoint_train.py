"""Checkpoints in real multi-process training: exact resume after SIGKILL, fallback past damaged
checkpoints, resharding between layouts and ZeRO stages, HF import into another layout, NaN skips,
and a dead rank ending the job.

Each launch runs several jobs (tests/workers/ckpt.py); launches dominate the time.
"""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megadeep.checkpoint import store
from tests.helpers import ROOT, read_json, rel_err, run_torchrun, write_text

TOL = 1e-5
DROPOUT = ["model.dropout=0.1", "model.attention_dropout=0.1"]  # so that RNG state matters on resume


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("data") / "text.txt")


def launch(tmp_path, name, nproc, text, jobs, check=True):
    jobs_file, out = tmp_path / f"{name}-jobs.json", tmp_path / f"{name}-out.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = run_torchrun("ckpt.py", nproc, str(jobs_file), str(out), str(text), check=check, timeout=900)
    return (read_json(out) if out.exists() else {}), proc


def flip_rng_to_malicious_pickle(ckpt_dir, marker):
    """Replace a rank's RNG file with a pickle that runs code, and make the manifest vouch for it."""
    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = pickle.dumps({"torch": Boom()})
    (ckpt_dir / "rng/rank00001.pt").write_bytes(evil)
    manifest = json.loads((ckpt_dir / store.MANIFEST).read_text())
    manifest["files"]["rng/rank00001.pt"] = {"sha256": store.sha256_bytes(evil), "bytes": len(evil)}
    (ckpt_dir / store.MANIFEST).write_text(json.dumps(manifest))


def test_exact_resume_after_sigkill_and_fallback_past_damage(text, tmp_path):
    common = ["train.steps=20", "checkpoint.save_every=5", "deepspeed.config=zero1", *DROPOUT]
    results, proc = launch(tmp_path, "kill", 2, text, [
        {"name": "ref", "overrides": common + [f"checkpoint.dir={tmp_path / 'ref'}"]},
        {"name": "killed", "overrides": common + [f"checkpoint.dir={tmp_path / 'run'}"], "kill_at_step": 11},
    ], check=False)
    assert proc.returncode != 0, "SIGKILL of rank 0 must fail the launch"
    assert "killed" not in results
    ref = results["ref"]["loss"]
    assert len(ref) == 20
    run = tmp_path / "run"
    assert store.latest(run).name == "step_00000010"
    assert not list(run.glob(".tmp-*"))

    # A crash while step 10's save is still being written in the background: step 5 stays latest.
    results, proc = launch(tmp_path, "killsave", 2, text, [
        {"name": "inflight", "overrides": common + [f"checkpoint.dir={tmp_path / 'inflight'}"],
         "kill_in_save_at_step": 10},
    ], check=False)
    assert proc.returncode != 0 and "inflight" not in results, "SIGKILL of rank 0's writer must fail the launch"
    inflight = tmp_path / "inflight"
    assert store.latest(inflight).name == "step_00000005"
    assert [p.name for p in store.candidates(inflight)] == ["step_00000005"]
    assert (inflight / ".tmp-step_00000010").is_dir()  # the half-written save, never visible as a checkpoint

    # Two damaged copies: a truncated weight file, and an RNG file swapped for a code-running pickle.
    truncated, poisoned = tmp_path / "truncated", tmp_path / "poisoned"
    shutil.copytree(run, truncated)
    shutil.copytree(run, poisoned)
    victim = truncated / "step_00000010" / "exp_avg-tp00-pp00.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])
    marker = tmp_path / "pwned"
    flip_rng_to_malicious_pickle(poisoned / "step_00000010", marker)

    resume = ["train.steps=20", "checkpoint.save_every=5", "deepspeed.config=zero1", *DROPOUT]
    results, proc = launch(tmp_path, "resume", 2, text, [
        {"name": name, "overrides": resume + [f"checkpoint.dir={tmp_path / name}"]}
        for name in ("run", "truncated", "poisoned", "inflight")
    ] + [{"name": "usr1", "overrides": resume + [f"checkpoint.dir={tmp_path / 'usr1'}"],
          "slow_save_at_step": 10, "usr1_at_step": 11}])
    r = results["run"]
    assert r["start"] == 10 and r["steps"] == list(range(11, 21))
    assert r["loss"] == ref[10:], "steps 11-20 after SIGKILL + resume must be bitwise identical"
    r = results["inflight"]
    assert r["start"] == 5 and r["loss"] == ref[5:], "a crash during a background save resumes from the one before"
    assert r["commits"] == [10, 15, 20] and not list(inflight.glob(".tmp-*"))  # the leftover is cleared
    # SIGUSR1 during step 11 while step 10's (slowed) save is in flight: that save completes, then step 11's.
    r = results["usr1"]
    assert r["in_flight_at_signal"] is True and r["preempted"] and r["steps"] == list(range(1, 12))
    assert r["commits"] == [5, 10, 11] and r["loss"] == ref[:11]
    assert store.latest(tmp_path / "usr1").name == "step_00000011"
    for step in (10, 11):
        store.Checkpoint.open(tmp_path / "usr1" / store.tag(step)).verify(
            json.loads((tmp_path / "usr1" / store.tag(step) / store.MANIFEST).read_text())["files"])
    for name, bad in (("truncated", "exp_avg-tp00-pp00.safetensors"), ("poisoned", "rank00001.pt")):
        r = results[name]
        assert r["start"] == 5 and r["loss"] == ref[5:], name  # fell back to step 5, still exact
        warning = [line for line in proc.stderr.splitlines() if f"{name}/step_00000010 is unusable" in line]
        assert warning and bad in warning[0] and "falling back" in warning[0], proc.stderr[-3000:]
    assert "weights_only" in proc.stderr and not marker.exists()


def test_reshard_zero_stages_nan_guard_and_hf_import(text, tmp_path):
    src_dir = tmp_path / "src"
    step5 = src_dir / "step_00000005"
    base = ["train.steps=10"]
    nan_jobs = [
        {"name": f"nan-zero{z}", "overrides": ["train.steps=5", f"deepspeed.config=zero{z}"],
         "nan_at_step": 3, "nan_rank": 1, "snapshot_step": 3} for z in (0, 1, 2, 3)
    ]
    # one of them also saves by the clock (every step here): skipped steps are not saved, the last 3 kept
    nan_jobs[1]["overrides"] += [f"checkpoint.dir={tmp_path / 'clock'}", "checkpoint.save_minutes=0.0001"]
    # The source: (TP, PP, DP) = (2, 2, 1), 10 steps, saving at step 5; its steps 6-10 are the reference.
    src, _ = launch(tmp_path, "src", 4, text, [
        {"name": "src", "overrides": base + ["parallel.tp=2", "parallel.pp=2", "deepspeed.config=zero1",
                                             f"checkpoint.dir={src_dir}", "checkpoint.save_every=5"]}])
    results, _ = launch(tmp_path, "reshard2", 2, text, [
        *[{"name": f"dp2-zero{z}", "overrides": base + [f"deepspeed.config=zero{z}", f"checkpoint.resume={step5}"]}
          for z in (0, 2, 3)],
        *nan_jobs,
        {"name": "abort", "overrides": ["train.steps=10", "train.max_consecutive_skips=3", "deepspeed.config=zero2",
                                        f"checkpoint.dir={tmp_path / 'abort'}", "checkpoint.save_every=1"],
         "nan_at_step": 3, "nan_until_step": 10, "nan_rank": 0},
    ])
    ref = src["src"]["loss"][5:]
    for z in (0, 2, 3):
        r = results[f"dp2-zero{z}"]
        assert r["start"] == 5 and r["steps"] == list(range(6, 11))
        err = rel_err(r["loss"], ref)
        print(f"(2,2,1) zero1 -> (1,1,2) zero{z}: loss rel err {err:.2e}")
        assert err < TOL, (z, r["loss"], ref)

    for z in (0, 1, 2, 3):
        r = results[f"nan-zero{z}"]
        assert r["skipped"] == [False, False, True, False, False] and r["skipped_total"] == 1, (z, r)
        assert r["unchanged"], f"zero{z}: a skipped step changed {r['changed_keys']}"
        assert all(x == x for i, x in enumerate(r["loss"]) if i != 2)  # finite again after the skip
    assert [store.step_of(p) for p in store.candidates(tmp_path / "clock")] == [5, 4, 2]
    assert "RunAborted: 3 non-finite steps in a row" in results["abort"]["error"]
    assert str(tmp_path / "abort" / "step_00000002") in results["abort"]["error"]

    # Offline: reshard to TP=4 with the CLI, and export → import through Hugging Face's format.
    subprocess.run([sys.executable, "-m", "megadeep", "ckpt", "reshard", str(step5), str(tmp_path / "tp4"), "--tp", "4"],
                   check=True, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, "-m", "megadeep", "ckpt", "export-hf", str(src_dir), str(tmp_path / "hf")],
                   check=True, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, "-m", "megadeep", "ckpt", "import-hf", str(tmp_path / "hf"),
                    str(tmp_path / "imported")], check=True, cwd=ROOT, capture_output=True)
    results, _ = launch(tmp_path, "reshard4", 4, text, [
        {"name": "tp4-offline", "overrides": base + ["parallel.tp=4", "deepspeed.config=zero1",
                                                     f"checkpoint.resume={tmp_path / 'tp4' / 'step_00000005'}"]},
        {"name": "tp4-onload", "overrides": base + ["parallel.tp=4", "deepspeed.config=zero0",
                                                    f"checkpoint.resume={step5}"]},
        {"name": "tp2dp2-zero3", "overrides": base + ["parallel.tp=2", "deepspeed.config=zero3",
                                                      f"checkpoint.resume={step5}"]},
        {"name": "from-hf", "overrides": ["train.steps=1", "optim.warmup_steps=0", "parallel.tp=2", "deepspeed.config=zero1",
                                          f"checkpoint.resume={tmp_path / 'imported' / 'step_00000000'}"]},
    ])
    for name in ("tp4-offline", "tp4-onload", "tp2dp2-zero3"):
        err = rel_err(results[name]["loss"], ref)
        print(f"(2,2,1) zero1 -> {name}: loss rel err {err:.2e}")
        assert results[name]["start"] == 5 and err < TOL, (name, results[name]["loss"], ref)

    # The imported weights in a TP=2 × DP=2 run give transformers' loss on the first batch.
    hf_loss = transformers_first_batch_loss(tmp_path / "hf", text)
    err = rel_err([results["from-hf"]["loss"][0]], [hf_loss])
    print(f"HF import into (2,1,2): first loss rel err vs transformers {err:.2e}")
    assert results["from-hf"]["start"] == 0 and err < TOL


def transformers_first_batch_loss(folder, text) -> float:
    from transformers import LlamaForCausalLM

    from megadeep.config import load_config, resolve
    from megadeep.data.loader import Loader, build_split
    from tests.workers.ckpt import TINY

    cfg = resolve(load_config(None, TINY + [f"data.paths=[{text}]"]), 1)
    tokens, targets = next(Loader(build_split(cfg).train, cfg.train.global_batch_size, 0, 1, cfg.train.seed))
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()


def test_dead_rank_ends_the_job(text, tmp_path):
    """SIGKILL one rank of a 4-process run: the launcher takes the others down and exits non-zero."""
    import psutil

    from tests.workers.ckpt import TINY

    metrics = tmp_path / "metrics.jsonl"
    cmd = [sys.executable, "-m", "megadeep", "train", str(tmp_path / "none.yaml"), *TINY, f"data.paths=[{text}]",
           "parallel.tp=2", "train.steps=100000", "train.dist_timeout_s=60", f"log.metrics_file={metrics}", "--nproc", "4"]
    (tmp_path / "none.yaml").write_text("name: dead-rank\n")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 400
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "RANK" in p.environ()]
        victim = next(p for p in workers if p.environ()["RANK"] == "2")
        killed = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        rc = proc.wait(timeout=150)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"dead rank: job exited with {rc} {elapsed:.1f} s after SIGKILL of rank 2")
    assert rc != 0 and elapsed < 120
    assert not [p for p in workers if alive(p)], "surviving ranks were left running"


def alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
