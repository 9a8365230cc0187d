"""Run every benchmark: ``python -m bench [--quick] [--only a,b] [--list]``.

Each benchmark runs in its own process group (a crash, a hang past ``--timeout`` or processes it
leaks are recorded as its failure and the run goes on). Writes ``bench/results/<date>-<host>.json``
(machine, command line, each benchmark's full result and wall seconds) and a markdown table of each
benchmark's ``headline(result)`` rows next to it; ``--quick`` runs are named ``...-quick.*``.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU = ("kernels", "train_throughput", "step_overhead", "step_profile", "pipeline_bubble", "zero_memory", "tp_comm", "cp_memory", "moe", "preprocess", "adam",
       "checkpoint", "planner_calibration", "construction", "tokenizer_throughput", "generation")
GPU = ("gpu_mfu",)  # kernels.py measures CPU kernels only


def describe(name: str) -> str:
    """First sentence of ``bench/<name>.py``'s docstring, read without importing it (torch is slow to import)."""
    doc = ast.get_docstring(ast.parse((ROOT / "bench" / f"{name}.py").read_text())) or ""
    return doc.split("\n\n")[0].replace("\n", " ").split(". ")[0]


def child(module: str, quick: bool, out: str) -> None:
    """Inside a benchmark's own process: run it, then write its result and headline rows."""
    mod = importlib.import_module(module)
    result = mod.run(quick=quick)
    report = {"result": result, "headline": []}
    if "skipped" not in result:
        try:
            report["headline"] = mod.headline(result)
        except Exception as e:  # the measured result is kept; the table says the headline broke
            report["headline_error"] = f"{type(e).__name__}: {e}"
    Path(out).write_text(json.dumps(report, indent=1, default=str))


def run_one(module: str, quick: bool, timeout: float, env: dict | None = None) -> dict:
    """Run ``module`` in a new session; whatever it leaves running is killed with its process group."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out, log = Path(tmp) / "out.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, "-m", "bench", "--child", module, "--out", str(out)] + (["--quick"] if quick else [])
        start = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        entry = {"wall_s": round(time.perf_counter() - start, 1)}
        if code == 0 and out.is_file():
            report = json.loads(out.read_text())
            status = "skipped" if "skipped" in report["result"] else "ok"
            return {"status": status, **entry, **report}
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
        return {"status": "failed", **entry, "error": why, "log_tail": log.read_text()[-4000:]}


def machine() -> dict:
    from bench.common import machine as base

    import torch

    m = {**base(), "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
         "loadavg_before": os.getloadavg()}
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name()
    return m


def fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def markdown(report: dict) -> str:
    m = report["machine"]
    kind = "QUICK run: small shapes, few repeats, a smoke test, not numbers to quote" if report["quick"] else "full run"
    lines = [f"# megadeep benchmarks, {m['date']} on {m['host']}: {kind}", "",
             f"`{report['command']}`: {m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}, {m['threads']} threads"
             + (f", GPU {m['gpu']}" if "gpu" in m else "")
             + f", load average {m['loadavg_before'][0]:.1f} before, {report['loadavg_after'][0]:.1f} after.", "",
             "| benchmark | measured | megadeep | baseline | ratio |", "|---|---|---|---|---|"]
    for name, b in report["benches"].items():
        if b["status"] != "ok":
            reason = b.get("error") or b["result"].get("skipped", "")
            lines.append(f"| {name} | **{b['status']}**: {reason} | | | |")
            continue
        if "headline_error" in b:
            lines.append(f"| {name} | headline failed: {b['headline_error']} (result in the JSON) | | | |")
        for r in b["headline"]:
            ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(f"| {name} | {r['what']} | {fmt(r['megadeep'])} | {fmt(r['baseline'])} | {ratio} |")
    lines += ["", "Wall seconds per benchmark: "
              + ", ".join(f"{n} {b['wall_s']:.0f} s ({b['status']})" for n, b in report["benches"].items())
              + f"; total {report['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def run_all(modules: dict[str, str], quick: bool, timeout: float, out_dir: Path, command: str,
            skipped: dict[str, str] | None = None, env: dict | None = None) -> tuple[Path, Path]:
    """Run ``modules`` (name → module) one after another; write the JSON and markdown reports, with
    the ``skipped`` benchmarks (name → why) listed as such."""
    start = time.perf_counter()
    report = {"quick": quick, "command": command, "machine": machine(), "benches": {}}
    for name, module in modules.items():
        print(f"{name:18} ...", end=" ", flush=True)
        b = report["benches"][name] = run_one(module, quick, timeout, env)
        error = f": {b['error']}" if b["status"] == "failed" else ""
        print(f"{b['status']} in {b['wall_s']:.0f} s{error}", flush=True)
    for name, why in (skipped or {}).items():
        report["benches"][name] = {"status": "skipped", "wall_s": 0.0, "result": {"skipped": why}}
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["loadavg_after"] = os.getloadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{report['machine']['host']}" + ("-quick" if quick else "")
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(markdown(report))
    return js, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    ap.add_argument("--only", default="", help="comma-separated benchmarks to run (see --list)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one benchmark may run (default 3600)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.quick, args.out)
        return 0
    if args.list:
        for name in CPU + GPU:
            print(f"{name:18} {'GPU' if name in GPU else 'CPU'}  {describe(name)}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(CPU + GPU)
    unknown = [n for n in names if n not in CPU + GPU]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(CPU + GPU)}", file=sys.stderr)
        return 2
    import torch

    skipped = {} if torch.cuda.is_available() else {n: "no CUDA device" for n in names if n in GPU}
    js, md = run_all({n: f"bench.{n}" for n in names if n not in skipped}, args.quick, args.timeout, args.out_dir,
                     " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]), skipped)
    print(md.read_text())
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
