"""How this process starts a local Ray (no ``cluster.address``): the object store's directory, size and prefault.

A hop's activation is copied once into the object store by its sender and read in place by its receiver
(neuroray/swarm/transport.py). On /dev/shm with 4 KiB pages that copy spends most of its time in page faults:
every process that maps a fresh part of the store faults each page in, once when the store first hands it out
and once more in every other process that maps it. ``cluster.object_store_prefault`` has the store fault all its
memory in at start (Ray's ``RAY_preallocate_plasma_memory``), and a store directory on a tmpfs mounted with
``huge=always`` makes each of the remaining faults cover 2 MiB. Together they bring a large hop's copy near a
plain memcpy (docs/hops.md, "Transport"; ``benchmarks/hop_overhead.py stores=default,huge``). A cluster joined
with ``ray start`` takes the same settings on its command line (README, docs/hops.md).
"""

from __future__ import annotations

import os

from neuroray.config import ClusterConfig
from neuroray.errors import ConfigError

PREFAULT_ENV = "RAY_preallocate_plasma_memory"


def object_store_options(cluster: ClusterConfig) -> dict:
    """The ``ray.init`` keyword arguments for the object store of a locally started Ray."""
    out: dict = {}
    if cluster.object_store_mb:
        out["object_store_memory"] = cluster.object_store_mb * 2**20
    if cluster.object_store_dir:
        if not os.path.isdir(cluster.object_store_dir):
            raise ConfigError(f"cluster.object_store_dir={cluster.object_store_dir} is not a directory: create (and "
                              "mount) it first, or leave it empty for /dev/shm")
        out["_plasma_directory"] = cluster.object_store_dir
    return out


def start_local_ray(cluster: ClusterConfig, **init_kwargs) -> None:
    """``ray.init`` a local cluster with the object store as configured; the prefault is read by the raylet at start."""
    import ray

    # Ray kills idle task workers after 1 s once actors fill the CPUs, so a task run once a round
    # (the outer step with diloco.outer_step_in=task) would pay a fresh worker start (~1.5 s of
    # importing torch) every time. Keep them around.
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "300000")
    if cluster.object_store_prefault:
        os.environ[PREFAULT_ENV] = "1"
    ray.init(address="local", **init_kwargs, **object_store_options(cluster))
