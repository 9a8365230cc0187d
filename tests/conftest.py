"""Fixtures shared by test modules."""
import os

import pytest

from tests.slurm_cluster import SlurmCluster, Unavailable

NO_CUDA = "gpu test: torch sees no CUDA device here; scripts/gpu-check.sh runs it on a GPU machine"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where CUDA is absent."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under scripts/gpu-check.sh (MEGADEEP_REQUIRE_GPU=1) a gpu test that skips fails: a GPU check
    must never pass by not running."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("MEGADEEP_REQUIRE_GPU") == "1" and item.get_closest_marker("gpu") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped during the GPU check: {report.longrepr}"


@pytest.fixture(autouse=True, scope="module")
def restore_environ():
    """Training in-process exports RANK/WORLD_SIZE/... (DeepSpeed reads them); without this a later
    test's CLI call would believe it was started by a launcher."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private two-node SLURM cluster (nodes n1, n2) on this machine; skips the test with the reason
    when SLURM is not installed or cannot start. Torn down by PID at the end of the session."""
    try:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except Unavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    yield cluster
    cluster.stop()
