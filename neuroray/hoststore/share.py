"""Make a run's data and snapshot stores reachable from every node, and prove it before any holder starts.

On one node nothing changes: local paths stay local paths. On several, a local dataset or snapshot
directory is served from the driver's node (``cluster.local_stores=serve``, the default) through
:mod:`neuroray.hoststore.service`; with ``cluster.local_stores=shared`` the paths are taken as a mount every
node sees. Either way, and for remote stores (``s3://``...) too, a tiny task on every node then reads the
dataset's manifest (it must hash to the driver's) and looks for a marker the driver wrote into the snapshot
store, so a store some hosts cannot read fails at start with one line naming the fix, not mid-run.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from neuroray.errors import StoreError

SERVE_THREADS = 16  # concurrent calls the store actor takes: every first-stage holder's prefetch plus snapshots


@dataclass
class SharedStores:
    """The URLs holders get, and the store actor serving them (None when nothing is served)."""

    data_url: str
    snapshot_root: str
    service: object | None = None
    timeout_s: float = 60.0

    def moved(self) -> dict | None:
        """What the served store moved per node (``service.HostStoreService.moved``); None when not serving."""
        if self.service is None:
            return None
        import ray

        return ray.get(self.service.moved.remote(), timeout=self.timeout_s)

    def close(self, log=None) -> dict | None:
        """Stop the store actor (holders must be gone); returns, and logs, what it moved to other nodes."""
        if self.service is None:
            return None
        import ray

        moved = None
        try:
            moved = self.moved()
            remote = [v for n, v in moved["by_node"].items() if n != moved["node_id"]]
            if log is not None:
                log(f"stores: the driver's node served {sum(v['sent'] for v in remote):,} bytes to other nodes "
                    f"and took {sum(v['received'] for v in remote):,} from them")
        finally:
            ray.kill(self.service)
            self.service = None
        return moved


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def share_stores(cluster, data_url: str, data_dir: str | os.PathLike, snapshot_root: str, log=print) -> SharedStores:
    """The stores holders use on this cluster (``cluster``: the run's ClusterConfig); raises StoreError when a
    node cannot read them. ``data_dir`` is the driver's local copy of the dataset's manifest."""
    from neuroray.genesis.store import is_remote, normalize

    nodes = _alive_nodes()
    shared = SharedStores(data_url, snapshot_root, timeout_s=cluster.store_timeout_s)
    if len(nodes) <= 1:
        return shared  # one machine: every path is already everywhere
    local = {u: not is_remote(u) for u in (data_url, snapshot_root)}
    if cluster.local_stores == "serve" and any(local.values()):
        from neuroray.hoststore.fs import host_url
        from neuroray.hoststore.service import start_service

        roots = {}
        if local[data_url]:
            roots[normalize(data_url)] = False  # the dataset is served read-only
        if local[snapshot_root]:
            Path(normalize(snapshot_root)).mkdir(parents=True, exist_ok=True)
            roots[normalize(snapshot_root)] = True
        shared.service, name = start_service(roots, SERVE_THREADS)
        chunk = cluster.store_chunk_mb << 20

        def serve(u):
            return host_url(name, cluster.store_timeout_s, chunk, normalize(u)) if local[u] else u

        shared.data_url, shared.snapshot_root = serve(data_url), serve(snapshot_root)
        log(f"stores: {len(nodes)} nodes; the driver's node serves "
            f"{' and '.join(u for u in roots)} to them ({shared.data_url.split('/', 3)[2].split(',')[0]})")
    try:
        probe_nodes(nodes, shared, data_dir, cluster)
    except BaseException:
        shared.close()
        raise
    return shared


def _fix(cluster, what: str) -> str:
    if cluster.local_stores == "shared":
        return (f"{what} is not a mount every node sees: set cluster.local_stores=serve (the driver's node serves "
                "local paths) or use a store every node reaches (s3://...)")
    return f"give every node access to {what} (credentials, network), or use a local path, which the driver's node serves"


def probe_nodes(nodes: list[dict], shared: SharedStores, data_dir, cluster) -> None:
    """One task per node, pinned there: read the manifest, see the snapshot marker. StoreError on the first
    node that cannot, naming it and the fix."""
    import fsspec
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from neuroray.genesis.manifest import MANIFEST_FILE

    from neuroray.hoststore import register

    register()
    want = hashlib.sha256((Path(data_dir) / MANIFEST_FILE).read_bytes()).hexdigest()
    marker = f".neuroray-probe-{uuid.uuid4().hex[:12]}"
    fs, base = fsspec.core.url_to_fs(shared.snapshot_root)
    fs.makedirs(base, exist_ok=True)
    fs.pipe_file(f"{base.rstrip('/')}/{marker}", b"probe\n")
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(_probe)
        refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            shared.data_url, want, shared.snapshot_root, marker): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=cluster.store_probe_timeout_s)
        if pending:
            late = ", ".join(refs[r]["NodeManagerAddress"] for r in pending)
            for r in pending:
                ray.cancel(r, force=True)
            raise StoreError(f"node(s) {late} did not read the stores within cluster.store_probe_timeout_s="
                             f"{cluster.store_probe_timeout_s:g}s; check those nodes, or raise the timeout")
        for ref in ready:
            problem = ray.get(ref)
            if problem is not None:
                where, detail = problem
                url = shared.data_url if where == "data" else shared.snapshot_root
                what = f"the data store {url}" if where == "data" else f"the snapshot store {url}"
                raise StoreError(f"node {refs[ref]['NodeManagerAddress']} cannot read {what} ({detail}); "
                                 f"{_fix(cluster, 'data.store' if where == 'data' else 'checkpoint.dir')}")
    finally:
        try:
            fs.rm_file(f"{base.rstrip('/')}/{marker}")
        except OSError:
            pass


def _probe(data_url: str, manifest_sha256: str, snapshot_root: str, marker: str):
    """On one node: None if both stores read as the driver sees them, else ``(which, why)``."""
    import fsspec

    from neuroray.errors import DataError
    from neuroray.genesis.manifest import MANIFEST_FILE
    from neuroray.genesis.store import Store
    from neuroray.hoststore import register

    register()
    try:
        data = Store(data_url).read(MANIFEST_FILE)
    except FileNotFoundError:
        return "data", f"it has no {MANIFEST_FILE} there"
    except DataError as exc:
        return "data", str(exc)
    if hashlib.sha256(data).hexdigest() != manifest_sha256:
        return "data", f"its {MANIFEST_FILE} differs from the driver's"
    try:
        fs, base = fsspec.core.url_to_fs(snapshot_root)
        if not fs.exists(f"{base.rstrip('/')}/{marker}"):
            return "snapshots", "a file the driver just wrote there is not visible"
    except Exception as exc:  # any backend error: the node cannot use the store
        return "snapshots", f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    return None
