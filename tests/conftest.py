"""Fixtures shared by test modules."""
import os

import pytest

from tests.slurm_cluster import SlurmCluster, Unavailable


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
