import os

import pytest

# Ray's local-cluster token auth is exercised by the job-submit path; tests start their own cluster.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module (ray.init takes 6-10 s: share it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
