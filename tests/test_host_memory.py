"""The CPU ranks' host allocator (``megadeep.training.host_memory``): which mode a run gets, and that each
mode does what it is for, measured in a fresh process (the settings are process-wide)."""
import subprocess
import sys

import pytest

from megadeep.config import load_config, resolve
from megadeep.training.run import resolve_run
from tests.helpers import ROOT

# Allocates, touches and frees a tensor larger than glibc's 32 MiB mmap ceiling, then allocates one half
# its size (an aligned request a bit larger than the bytes it asks for fits in the freed block whatever
# was allocated after it): prints the page faults the second tensor took and the resident bytes its free
# gave back.
PROBE = r"""
import resource, sys, torch
from megadeep.training import host_memory
for mode in sys.argv[1].split(","):
    if mode == "reuse":
        assert host_memory.reuse_freed_memory()
    elif mode == "lean":
        assert host_memory.tune_cpu_allocator()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
n = 64 * 2**20 // 4
torch.ones(2 * n)  # allocated, touched and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = rss()
del x
print(faults, held - rss())
"""


@pytest.mark.parametrize("recipe,device,mode", [
    ("zero0", "cpu", "reuse"), ("zero1", "cpu", "reuse"), ("zero3", "cpu", "lean"), ("zero0", "cuda", "system")])
def test_each_run_gets_one_host_allocator(recipe, device, mode):
    cfg = resolve(load_config(ROOT / "configs" / "llama3-8b.yaml", [f"deepspeed.config={recipe}"]), 32,
                  require_data=False)
    assert resolve_run(cfg, device).host_allocator == mode


def probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, check=True)
    faults, returned = out.stdout.split()
    return int(faults), int(returned)


def test_reuse_keeps_freed_pages_and_lean_returns_them():
    pages = 64 * 2**20 // 4096
    faults, returned = probe("reuse")
    # the second 64 MiB tensor lands on resident pages and its free keeps them (a page or two may move
    # either way around the free: the interpreter's own allocations)
    assert faults < pages // 10 and returned < 2**20
    faults, returned = probe("system")
    assert faults > pages // 2 and returned > 32 * 2**20  # glibc maps it afresh and unmaps it on free
    for modes in ("lean", "reuse,lean"):  # lean undoes reuse (a ZeRO-3 run after another in one process)
        faults, returned = probe(modes)
        assert faults > pages // 2 and returned > 32 * 2**20, modes
