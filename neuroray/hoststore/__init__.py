"""The driver-hosted store: local paths on the driver's disk, served to every node of a cluster through Ray.

Across machines a local ``data.store`` or snapshot directory exists on one disk only. Rather than ask for a
shared mount or an object store, the run starts one small actor pinned to the driver's node
(:mod:`neuroray.hoststore.service`) and hands holders ``nrhost://`` URLs that an fsspec filesystem
(:mod:`neuroray.hoststore.fs`) resolves through it, so Genesis fetch (SHA-256 checked through each host's
cache) and ``SnapshotStore`` work unchanged. :mod:`neuroray.hoststore.share` decides when (a cluster of more
than one node) and proves at start that every node reads the data. See docs/lab.md.

This module stays light (fsspec's registry only): every Store and SnapshotStore calls :func:`register`.
"""

from __future__ import annotations

PROTOCOL = "nrhost"
NAMESPACE = "neuroray-stores"  # Ray namespace of the store actors: holders of any job look them up by name

_registered = False


def register() -> None:
    """Teach this process's fsspec the ``nrhost://`` protocol (also declared as an fsspec entry point in
    pyproject.toml; registering here covers a checkout on PYTHONPATH whose package metadata lacks it)."""
    global _registered
    if not _registered:
        from fsspec.registry import register_implementation

        register_implementation(PROTOCOL, "neuroray.hoststore.fs.HostFileSystem", clobber=True)
        _registered = True
