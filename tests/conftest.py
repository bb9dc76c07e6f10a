import os

import pytest

# Ray's local-cluster token auth is exercised by the job-submit path; tests start their own cluster.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module (ray.init takes 6-10 s: share it). It declares 2 GPUs
    that do not exist, so the GPU code paths (num_gpus, device placement) run on this CPU box."""
    import ray

    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")  # as neuroray.train does
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)  # fake GPUs
    yield ray
    ray.shutdown()
