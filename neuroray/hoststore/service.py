"""The actor behind ``nrhost://``: plain files under a few directories of the driver's disk, read and
written in chunks that travel as Ray objects (return values and arguments go through the object store).

A write goes to a hidden part file and is renamed into place when its last chunk arrives, so no reader
ever sees half a file (artefact manifests rely on that). Paths outside the served roots are refused. The
actor counts the bytes it moved per calling node, so a run can say what crossed the wire for its stores.
"""

from __future__ import annotations

import os
import stat
import threading
import uuid


def _entry(path: str, st: os.stat_result) -> dict:
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    return {"name": path, "size": 0 if kind == "directory" else st.st_size, "type": kind}


class HostStoreService:
    """Files under ``roots`` (``{directory: writable}``) on this node's disk."""

    def __init__(self, roots: dict[str, bool]):
        self.roots = {os.path.realpath(r): bool(w) for r, w in roots.items()}
        self.node_id = _node_id()
        self._moved: dict[str, list[int]] = {}  # node id -> [bytes sent to it, bytes received from it]
        self._lock = threading.Lock()

    def _checked(self, path: str, write: bool = False) -> str:
        real = os.path.realpath(path)
        for root, writable in self.roots.items():
            if real == root or real.startswith(root + os.sep):
                if write and not writable:
                    raise PermissionError(13, "the driver-hosted store serves this directory read-only", path)
                return real
        raise PermissionError(13, "outside the directories the driver-hosted store serves", path)

    def _count(self, node: str, sent: int, received: int) -> None:
        with self._lock:
            moved = self._moved.setdefault(node, [0, 0])
            moved[0] += sent
            moved[1] += received

    def info(self, path: str) -> dict:
        return _entry(path, os.stat(self._checked(path)))

    def ls(self, path: str) -> list[dict]:
        real = self._checked(path)
        if not os.path.isdir(real):
            return [_entry(path, os.stat(real))]
        base = path.rstrip("/")
        out = []
        with os.scandir(real) as it:
            for e in it:
                if not e.name.endswith(".part"):  # uploads in flight are not files yet
                    out.append(_entry(f"{base}/{e.name}", e.stat()))
        return sorted(out, key=lambda e: e["name"])

    def read(self, path: str, start: int, end: int, node: str) -> tuple[bytes, int]:
        """Bytes ``[start, end)`` of ``path`` and its whole size (the caller asks again for the rest)."""
        with open(self._checked(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(start)
            data = f.read(max(0, min(end, size) - start))
        self._count(node, len(data), 0)
        return data, size

    def write(self, path: str, upload: str, data: bytes, first: bool, final: bool, node: str) -> None:
        """Append one chunk of upload ``upload``; the last one renames the part file onto ``path``."""
        real = self._checked(path, write=True)
        part = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.{upload}.part")
        if first:
            os.makedirs(os.path.dirname(real), exist_ok=True)
        with open(part, "wb" if first else "ab") as f:
            f.write(data)
            if final:
                f.flush()
                os.fsync(f.fileno())
        if final:
            os.replace(part, real)
        self._count(node, 0, len(data))

    def abort(self, path: str, upload: str) -> None:
        real = self._checked(path, write=True)
        part = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.{upload}.part")
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass

    def makedirs(self, path: str) -> None:
        os.makedirs(self._checked(path, write=True), exist_ok=True)

    def rm(self, path: str, recursive: bool) -> None:
        real = self._checked(path, write=True)
        if os.path.isdir(real) and recursive:
            import shutil

            shutil.rmtree(real)
        elif os.path.isdir(real):
            os.rmdir(real)
        else:
            os.unlink(real)

    def moved(self) -> dict:
        """``{"node_id": ..., "by_node": {node: {"sent", "received"}}}``: what this store moved, per caller."""
        with self._lock:
            by = {n: {"sent": s, "received": r} for n, (s, r) in self._moved.items()}
        return {"node_id": self.node_id, "by_node": by}


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def start_service(roots: dict[str, bool], max_concurrency: int):
    """Start the store actor on this (the driver's) node, pinned there; returns ``(handle, name)``.

    ``num_cpus=0`` so it fits beside holders that take every CPU; threaded so several holders read at once.
    It is owned by the driver (not detached): it ends with the run, even when the run is killed.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from neuroray.hoststore import NAMESPACE

    name = f"neuroray-store-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = ray.remote(HostStoreService).options(
        name=name, namespace=NAMESPACE, num_cpus=0, max_concurrency=max_concurrency, scheduling_strategy=here,
    ).remote(roots)
    return handle, name
