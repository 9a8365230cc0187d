import os

import pytest


@pytest.fixture(autouse=True, scope="module")
def restore_environ():
    """Training in-process exports RANK/WORLD_SIZE/... (DeepSpeed reads them); without this a later
    test's CLI call would believe it was started by a launcher."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
