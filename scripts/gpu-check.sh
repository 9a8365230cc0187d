#!/usr/bin/env bash
# The GPU check, in one command, on a machine with one (or more) NVIDIA GPU(s) and megadeep installed
# with its CUDA kernels (scripts/setup.sh on a CUDA torch):
#   - the tests marked `gpu` (tests/test_gpu.py): CUDA kernels against fp64 references in fp32/bf16/fp16
#     incl. backward; single-GPU training for every ds_configs recipe (offload included) with the Adam
#     that choose_adam picks; bf16 tracking the fp32 loss curve; the attention backend (flash SDPA);
#   - the GPU MFU benchmark (python -m bench --only gpu_mfu), results under bench/results/.
# A gpu test that skips fails here (MEGADEEP_REQUIRE_GPU=1): nothing the GPU should run passes silently.
# Usage: scripts/gpu-check.sh [extra pytest args]; PYTHON=... picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch sees no CUDA device (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
from megadeep.ops import fused
ok, why = fused.load()
print(f"gpu-check: {torch.cuda.device_count()} × {torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, megadeep._C {'with CUDA kernels' if ok and fused.cuda_built() else 'NOT built for CUDA: ' + why}")
PYEOF
export MEGADEEP_REQUIRE_GPU=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
"$PY" -m pytest -m gpu -rA -s -q tests/test_gpu.py "$@"
"$PY" -m bench --only gpu_mfu
