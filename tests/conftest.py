"""Session fixtures shared by test modules."""
import pytest

from tests.slurm_cluster import SlurmCluster, Unavailable


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
