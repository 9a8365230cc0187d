"""``python -m bench``: lists every benchmark, and runs each in its own process group, recording a
crash (and killing what it leaked) without stopping the others. Stub benchmarks stand in for the real
ones, which take minutes; no timings are checked."""
import ast
import json
import os
import subprocess
import sys
import textwrap
import time

from tests.helpers import ROOT

BENCH = ROOT / "bench"
NOT_BENCHES = {"__init__", "__main__", "common"}

OK = """
from bench.common import row

def run(quick=False):
    return {"quick": quick, "value": 3.0}

def headline(result):
    return [row("stub value vs one", result["value"], 1.5)]
"""
CRASH = """
import subprocess, sys

def run(quick=False):
    leaked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open({pid_file!r}, "w").write(str(leaked.pid))
    raise RuntimeError("stub benchmark crashed")
"""


def test_list_names_every_benchmark_and_each_has_run_and_headline():
    proc = subprocess.run([sys.executable, "-m", "bench", "--list"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines()}
    files = {p.stem for p in BENCH.glob("*.py")} - NOT_BENCHES
    assert listed == files
    for name in files:
        tree = ast.parse((BENCH / f"{name}.py").read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"run", "headline"} <= functions, name


def test_unknown_benchmark_is_refused():
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "kernels,nope"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "unknown benchmark(s) nope" in proc.stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = f"/proc/{pid}/status"
    return not (os.path.exists(status) and "\nState:\tZ" in open(status).read())


def test_runner_collects_results_and_survives_a_crash(tmp_path):
    from bench.__main__ import run_all

    pid_file = tmp_path / "leaked.pid"
    (tmp_path / "stub_ok.py").write_text(textwrap.dedent(OK))
    (tmp_path / "stub_crash.py").write_text(textwrap.dedent(CRASH.format(pid_file=str(pid_file))))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = tmp_path / "results"
    js, md = run_all({"crash": "stub_crash", "ok": "stub_ok"}, True, 120, out, "python -m bench --quick",
                     skipped={"gpu": "no CUDA device"}, env=env)
    assert js.parent == out and js.name.endswith("-quick.json") and md.name.endswith("-quick.md")
    report = json.loads(js.read_text())
    assert report["quick"] is True and report["command"] == "python -m bench --quick"
    assert list(report["benches"]) == ["crash", "ok", "gpu"]
    crash, ok = report["benches"]["crash"], report["benches"]["ok"]
    assert crash["status"] == "failed" and "stub benchmark crashed" in crash["log_tail"]
    assert ok["status"] == "ok" and ok["result"] == {"quick": True, "value": 3.0}
    assert ok["headline"] == [{"what": "stub value vs one", "megadeep": 3.0, "baseline": 1.5, "ratio": 2.0}]
    assert report["benches"]["gpu"]["status"] == "skipped"
    deadline = time.time() + 10  # the crashed benchmark's leaked process was killed with its group
    while alive(int(pid_file.read_text())) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(int(pid_file.read_text()))
    text = md.read_text()
    assert "QUICK run" in text
    assert "| ok | stub value vs one | 3.00 | 1.50 | 2.00 |" in text
    assert "| crash | **failed**: exit code 1 |" in text and "| gpu | **skipped**: no CUDA device |" in text
